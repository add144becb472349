"""One SMTP session that carries many messages: the transaction, per-recipient outcomes.

Theory of operation
-------------------

:class:`SMTPConnection` is the transport: it opens the session with
:mod:`smtplib` (:mod:`mailspool.smtp.handshake`), then drives each
transaction itself through the sans-IO engine of
:mod:`mailspool.smtp.protocol` (``MAIL``, one ``RCPT`` per recipient,
``DATA``), writing what the engine asks and feeding it the replies,
instead of calling ``sendmail()``, for three reasons:

* every recipient's reply is kept (``sendmail()`` only reports refusals when
  some were accepted, and raises without them otherwise), so the caller
  learns exactly who got the message (:class:`~mailspool.result.SendResult`);
* each phase gets its own socket timeout: the short one for commands and for
  each block of data, the long one (10 minutes by default, as RFC 5321
  4.5.3.2 asks) for the reply after the final dot, because giving up early
  there is what causes duplicate deliveries;
* failures are classified where they happen (:mod:`mailspool.errors`), and
  one that comes at or after ``DATA`` carries the outcome per recipient
  (``.result``): it answers only for the recipients accepted at ``RCPT``,
  never for those refused there, which keep their own replies.

When the relay offers PIPELINING (RFC 2920), ``MAIL``, the ``RCPT``
commands and ``DATA`` go out in one write and their replies are read in
order: two round trips a message instead of three plus one per recipient.
The message data still waits for ``DATA``'s 354, so a refusal anywhere
before it transmits nothing of the message, and the stale-session retry
below holds unchanged.  ``SMTPMailer(pipelining=False)`` turns it off.
Nothing of the next message is ever written with a final dot: a relay
(Postfix does) may hold its 250 until it has read what follows, and an
acceptance hidden that way is a duplicate when the session breaks.

After a refused transaction it sends ``RSET`` and stays usable; after
anything that leaves the session in an unknown state (a timeout, a lost
connection, a 421, a garbled reply) the session is closed and never used
again.

A reused connection may have been closed by the relay while it sat idle.
:meth:`SMTPConnection.send` notices that before ``MAIL`` when it can (the
socket became readable: the relay closed it or said 421), or at ``MAIL``
(a drop or a 421 in answer), and then opens a new session and sends once
more -- only when the session had already carried a transaction, and only
up to ``MAIL``: nothing of the message had been transmitted.  Once ``MAIL``
was accepted nothing is retried here, and after ``DATA`` never, since the
relay may already hold the message.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import time
from types import TracebackType

from mailspool.errors import ConnectionFailed, DeliveryError
from mailspool.message import Envelope
from mailspool.smtp.esmtp import (
    ascii_headers,
    mail_parameters,
    size_limit,
    wire_bytes,
)
from mailspool.smtp.handshake import Credentials, network_error, open_session
from mailspool.smtp.protocol import (
    Failed,
    Finished,
    Phase,
    ProtocolViolation,
    Read,
    ReplyReader,
    Step,
    Transaction,
    Write,
    WriteMessage,
)
from mailspool.smtp.result import Reply, SendResult, with_result
from mailspool.smtp.seams import SessionSettings
from mailspool.smtp.wire import Poller, read_reply, set_timeout, write_data

__all__ = ["SMTPConnection"]

log = logging.getLogger("mailspool.smtp")

#: send() does not look at the socket again when :attr:`SMTPConnection.alive`
#: found it quiet less than this many seconds ago (the pool looks when it
#: hands the connection out); a relay that closed in between is still
#: caught at ``MAIL``, as a stale session.
_QUIET_FOR = 0.005


class _Stale(Exception):
    """The relay dropped a reused session before the transaction began.

    Nothing of the message was transmitted, so it is safe to reconnect and
    send again.
    """

    def __init__(self, error: DeliveryError) -> None:
        super().__init__(str(error))
        self.error = error


class SMTPConnection:
    """One SMTP session with a relay, ready for any number of messages.

    Made by :meth:`mailspool.mailer.SMTPMailer.connect`; not safe to share
    between threads.  Use it as a context manager, or call :meth:`close`.

    Args:
        mailer: the settings to use: the :class:`~mailspool.smtp.mailer.SMTPMailer`
            that makes the connection (any
            :class:`~mailspool.smtp.seams.SessionSettings`).
        credentials: for AUTH (also when reconnecting), or ``None``.

    Raises:
        the errors :meth:`mailspool.mailer.SMTPMailer.connect` lists.

    Attributes:
        host, port: the relay.
        features: the ESMTP keywords the relay offered after TLS (lower case).
        max_size: the relay's SIZE limit in octets, or ``None``.
        transactions: how many messages this connection delivered.
        reconnects: how many times :meth:`send` replaced a session the relay
            had closed while it was idle.
        waited: seconds spent waiting for the relay's replies to
            transactions, in all (what the processor grows connections by).
    """

    def __init__(self, mailer: SessionSettings, credentials: Credentials | None = None) -> None:
        self._mailer = mailer
        self._credentials = credentials
        self.host = mailer.host
        self.port = mailer.port
        self._where = f"{self.host}:{self.port}"  # for log lines and error texts
        self.transactions = 0
        self.reconnects = 0
        self.waited = 0.0
        self.features: dict[str, str] = {}
        self.max_size: int | None = None
        self._smtp: smtplib.SMTP | None = None
        self._reused = False  # this session has carried a transaction (MAIL was sent)
        self._poller = Poller()
        self._quiet_at = -_QUIET_FOR  # time.monotonic() when alive last found it quiet
        self._open()

    def __repr__(self) -> str:
        state = "open" if self._smtp is not None else "closed"
        return f"<SMTPConnection {self._where} tls={self._mailer.tls} {state}>"

    def __enter__(self) -> SMTPConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> None:
        smtp = open_session(self._mailer, self._credentials)
        self._smtp = smtp
        self._reused = False
        self.features = dict(smtp.esmtp_features)
        self.max_size = size_limit(self.features)
        log.debug(
            "connected to %s (tls=%s, auth=%s)",
            self._where,
            self._mailer.tls,
            self._credentials is not None,
        )

    def _reopen(self, why: str) -> None:
        log.info("relay %s closed a reused connection (%s); reconnecting", self._where, why)
        self._drop()
        self.reconnects += 1
        self._open()

    # -- state --------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True when the connection can take the next message.

        False after :meth:`close`, after any failure that left the session
        in an unknown state, and when the relay has closed the connection
        (or said anything) since its last reply.
        """
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            return False
        if self._poller.readable(smtp.sock):
            return False
        self._quiet_at = time.monotonic()
        return True

    @property
    def pipelining(self) -> bool:
        """True when ``MAIL``, every ``RCPT`` and ``DATA`` go out in one write."""
        return self._mailer.pipelining and "pipelining" in self.features

    def _drop(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def close(self) -> None:
        """Say QUIT (briefly, ignoring any failure) and close the connection."""
        smtp = self._smtp
        if smtp is None:
            return
        try:
            if smtp.sock is not None and self.alive:
                smtp.sock.settimeout(min(self._mailer.timeout, 5.0))
                smtp.docmd("QUIT")
        except OSError:
            pass
        finally:
            self._drop()

    def noop(self) -> bool:
        """Send NOOP; True when the relay answered 250 (else the connection is closed)."""
        smtp = self._smtp
        if smtp is None:
            return False
        try:
            code, _ = smtp.docmd("NOOP")
        except OSError:
            code = -1
        if code != 250:
            self._drop()
            return False
        return True

    # -- sending ------------------------------------------------------------

    def check(self, envelope: Envelope, data: bytes) -> list[str]:
        """Check a message against what the relay offers; return the MAIL parameters.

        Nothing is sent and the connection stays usable.

        Args:
            envelope: the validated envelope.
            data: the message's wire bytes.

        Returns:
            The ``MAIL FROM`` parameters to use (``SMTPUTF8``,
            ``BODY=8BITMIME``, ``SIZE=n``).

        Raises:
            SMTPUTF8Required: an address is not ASCII and the relay does not
                offer SMTPUTF8.
            PermanentError: the data has 8-bit bytes and the relay offers
                neither 8BITMIME nor SMTPUTF8.
            MessageTooLarge: the message is larger than the relay's SIZE.
        """
        data = ascii_headers(data, self.features, self._where)  # as send() would
        return mail_parameters(envelope, data, self.features, self.max_size, self._where)

    def send(self, envelope: Envelope, data: bytes, *, retry_stale: bool = True) -> SendResult:
        """Send one message over this connection.

        Args:
            envelope: the validated envelope (:func:`mailspool.message.make_envelope`).
            data: the message as :func:`mailspool.message.to_wire` returns it
                (other line endings are normalised, never sent as they are).
            retry_stale: when this session has already carried a message and
                the relay turns out to have closed it while it was idle (the
                socket shows it, or ``MAIL`` gets no reply or a 421), open a
                new session and send once more.  Never after ``MAIL`` was
                accepted: nothing is sent twice.  ``False`` raises instead.

        Returns:
            The :class:`~mailspool.smtp.result.SendResult`; at least one
            recipient was accepted.

        Raises:
            RecipientsRefused: no recipient was accepted (after RSET the
                connection stays usable).
            DeliveryError: the classified failure; the connection is closed
                when the failure left the session in an unknown state.  If
                reconnecting fails, the error of the new connection
                (``RelayUnavailable``, ``TLSFailure``...), about the relay.
                A failure at or after ``DATA`` (``DATA`` or the message
                refused, the session lost on the way) carries a ``.result``
                (:func:`~mailspool.smtp.result.with_result`): the refusal's
                reply for every recipient accepted at ``RCPT`` (none for a
                lost session), and each ``RCPT`` refusal with its own reply.
        """
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            raise ConnectionFailed(f"the connection to {self._where} is closed")
        # Without SMTPUTF8, UTF-8 headers go as RFC 2047 words (esmtp.ascii_headers).
        data = ascii_headers(wire_bytes(data), self.features, self._where)
        stale_ok = retry_stale and self._reused
        if (
            stale_ok
            and time.monotonic() - self._quiet_at >= _QUIET_FOR
            and self._poller.readable(smtp.sock)
        ):
            # Closed (or a 421 said) while idle: no need to try MAIL first.
            self._reopen("seen before MAIL")
            stale_ok = False
        try:
            return self._send(envelope, data, stale_ok=stale_ok)
        except _Stale as stale:
            self._reopen(str(stale.error))
            return self._send(envelope, data, stale_ok=False)

    def _send(self, envelope: Envelope, data: bytes, *, stale_ok: bool) -> SendResult:
        smtp = self._smtp
        assert smtp is not None
        options = self.check(envelope, data)
        try:
            tx = Transaction(envelope, options, pipelining=self.pipelining)
            return self._transaction(smtp, tx, data, stale_ok)
        except (DeliveryError, _Stale):
            raise
        except BaseException:
            self._drop()
            raise

    def _transaction(
        self, smtp: smtplib.SMTP, tx: Transaction, data: bytes, stale_ok: bool
    ) -> SendResult:
        """Do what the engine asks until the transaction is over."""
        sock = smtp.sock
        assert sock is not None
        set_timeout(sock, self._mailer.timeout)
        self._reused = True
        reader = ReplyReader()
        # A failure up to MAIL's reply means nothing of the message was
        # transmitted (pipelined or not, the data only follows DATA's 354).
        self._write(smtp, tx.start(), tx.phase, stale_ok)
        step: Step = Read()
        while True:
            if isinstance(step, Write) and tx.draining:
                step = self._after_refusal(smtp, reader, tx, step)
                continue
            if isinstance(step, Write):
                self._write(smtp, step.data, tx.phase, False)
            elif isinstance(step, WriteMessage):
                self._write_message(smtp, sock, tx, data)
            elif isinstance(step, Finished):
                self.transactions += 1
                self._debug_result(tx, step.result)
                return step.result
            elif isinstance(step, Failed):
                raise self._failure(tx, step, stale_ok)
            if tx.draining:
                step = self._after_refusal(smtp, reader, tx, step)
                continue
            phase = tx.phase
            try:
                reply = self._reply(smtp, reader, phase, stale_ok and phase is Phase.MAIL)
            except DeliveryError as exc:
                if phase in (Phase.DATA, Phase.DOT):
                    with_result(exc, tx.envelope.recipients, tx.accepted, tx.refused)
                raise
            step = tx.receive(reply)
            if phase is Phase.DOT and smtp.sock is not None:
                set_timeout(sock, self._mailer.timeout)

    def _after_refusal(
        self, smtp: smtplib.SMTP, reader: ReplyReader, tx: Transaction, step: Step
    ) -> Step:
        """One step of reading what is due after a pipelined refusal.

        Whatever the network does now, the refusal is the outcome: a
        session that breaks here only ends the session.
        """
        try:
            if isinstance(step, Write):
                self._write(smtp, step.data, tx.phase, False)
            return tx.receive(self._reply(smtp, reader, tx.phase, False))
        except DeliveryError:
            self._drop()
            return tx.session_lost()

    def _failure(self, tx: Transaction, failed: Failed, stale_ok: bool) -> Exception:
        """What the session does after a failed transaction; the error to raise."""
        if failed.then == "close":
            self._drop()
            if stale_ok and failed.error.phase == "mail" and failed.error.code == 421:
                return _Stale(failed.error)  # a 421 to MAIL on a reused session
        elif failed.then == "rset":
            self._reset()
        return failed.error

    def _write(self, smtp: smtplib.SMTP, data: bytes, phase: Phase, stale_ok: bool) -> None:
        """Write commands; a failure is classified as the phase's (see :meth:`_failed`)."""
        try:
            smtp.send(data)
        except OSError as exc:
            raise self._failed(exc, str(phase), stale_ok) from exc

    def _write_message(
        self, smtp: smtplib.SMTP, sock: socket.socket, tx: Transaction, data: bytes
    ) -> None:
        """The message and its final dot, in blocks; then the long wait's timeout."""
        try:
            write_data(smtp, data)
        except OSError as exc:
            # The final dot was not (completely) sent: nothing was delivered.
            error = self._translate(exc, "the message data")
            raise with_result(error, tx.envelope.recipients, tx.accepted, tx.refused) from exc
        # The long wait: a relay may take minutes to queue the message
        # (RFC 5321 4.5.3.2.6), and giving up early duplicates it.
        set_timeout(sock, self._mailer.data_timeout)

    def _reply(
        self, smtp: smtplib.SMTP, reader: ReplyReader, phase: Phase, stale_ok: bool
    ) -> Reply:
        """Read the next reply; network failures and garbage are classified.

        With ``stale_ok`` a failure is wrapped in :class:`_Stale` (safe to retry).
        """
        after_dot = phase is Phase.DOT
        started = time.monotonic()
        try:
            reply = read_reply(smtp, reader)
            self.waited += time.monotonic() - started
            return reply
        except OSError as exc:
            if after_dot:
                raise self._translate(exc, str(phase), maybe_sent=True) from exc
            raise self._failed(exc, str(phase), stale_ok) from exc
        except ProtocolViolation as exc:
            self._drop()
            maybe = "; the message may have been delivered" if after_dot else ""
            error = ConnectionFailed(
                f"{self._where} sent a malformed reply to {phase}: {exc.line!r}{maybe}"
            )
            raise _Stale(error) if stale_ok else error from exc

    def _debug_result(self, tx: Transaction, result: SendResult) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "relay %s took the message for %d of %d recipient(s): %s",
                self._where,
                len(result.accepted),
                len(tx.envelope.recipients),
                result.reply,
            )

    def _reset(self) -> None:
        """After a refused transaction: RSET, or close when the relay does not take it."""
        smtp = self._smtp
        if smtp is None:
            return
        try:
            rset, _ = smtp.docmd("RSET")
        except OSError:
            rset = -1
        if rset != 250:
            self._drop()

    def _failed(self, exc: OSError, phase: str, stale_ok: bool) -> Exception:
        """:meth:`_translate`, wrapped in :class:`_Stale` when ``stale_ok`` (safe to retry)."""
        error = self._translate(exc, phase)
        return _Stale(error) if stale_ok else error

    def _translate(self, exc: OSError, phase: str, *, maybe_sent: bool = False) -> DeliveryError:
        """Turn a network-level failure into a classified error; close the connection."""
        self._drop()
        m = self._mailer
        limit = m.data_timeout if maybe_sent else m.timeout
        return network_error(exc, self._where, phase, limit=limit, maybe_sent=maybe_sent)
