"""One SMTP session that carries many messages: the transaction, per-recipient outcomes.

Theory of operation
-------------------

:class:`SMTPConnection` drives each transaction itself (``MAIL``, one
``RCPT`` per recipient, ``DATA``) over the standard library's
:mod:`smtplib` instead of calling ``sendmail()``, for three reasons:

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
import select
import smtplib
import socket
import ssl
import time
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from mailspool.errors import ConnectionFailed, DeliveryError, error_for_reply, reply_text
from mailspool.message import Envelope
from mailspool.smtp.esmtp import dot_stuff, mail_parameters, size_limit, wire_bytes
from mailspool.smtp.handshake import Credentials, network_error, open_session
from mailspool.smtp.result import Reply, SendResult, all_refused, with_result

if TYPE_CHECKING:
    from mailspool.smtp.mailer import SMTPMailer

__all__ = ["SMTPConnection"]

log = logging.getLogger("mailspool.smtp")

# Message data is written in blocks, each with the command timeout, so that
# a large message on a slow link is not cut off by one total deadline
# (socket.sendall's timeout covers the whole call).
_BLOCK = 256 * 1024


def _set_timeout(sock: socket.socket, timeout: float | None) -> None:
    """Set the socket's timeout, unless it already is that.

    Each ``settimeout()`` is a system call that lets go of the interpreter
    lock; a message would otherwise make three of them.
    """
    if sock.gettimeout() != timeout:
        sock.settimeout(timeout)


#: send() does not look at the socket again when :attr:`SMTPConnection.alive`
#: found it quiet less than this many seconds ago (the pool looks when it
#: hands the connection out); a relay that closed in between is still
#: caught at ``MAIL``, as a stale session.
_QUIET_FOR = 0.005


class _Poller:
    """Whether a socket is readable, with one ``poll`` object per socket."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._poll: Any = None

    def readable(self, sock: socket.socket) -> bool:
        """True when the peer sent something (or closed) while we expected silence."""
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            if not hasattr(select, "poll"):
                ready, _, _ = select.select([sock], [], [], 0)
                return bool(ready)
            if sock is not self._sock:
                self._poll = select.poll()
                self._poll.register(sock, select.POLLIN | select.POLLPRI)
                self._sock = sock
            return bool(self._poll.poll(0))
        except (OSError, ValueError):
            return True


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def _mail_args(envelope: Envelope, options: list[str]) -> str:
    """What follows ``MAIL`` for ``envelope`` with these parameters."""
    return f"FROM:<{envelope.sender}>{''.join(f' {option}' for option in options)}"


def _group(envelope: Envelope, mail: str) -> str:
    """``MAIL`` (with its arguments ``mail``), every ``RCPT`` and ``DATA``, as one text."""
    lines = [f"MAIL {mail}\r\n"]
    lines.extend(f"RCPT TO:<{rcpt}>\r\n" for rcpt in envelope.recipients)
    lines.append("DATA\r\n")
    group = "".join(lines)
    if group.count("\n") != len(lines) or group.count("\r") != len(lines):
        # Validated envelopes never get here; a line break would be injection.
        raise ValueError("an SMTP command may not contain CR or LF")
    return group


class _Ahead(NamedTuple):
    """A message whose commands went out ahead: as given to send(), and as checked."""

    envelope: Envelope
    data: bytes  # the object given as ``then``
    wire: bytes  # wire_bytes(data)
    options: list[str]  # its MAIL parameters


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
        mailer: the :class:`~mailspool.mailer.SMTPMailer` whose settings to use.
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

    def __init__(self, mailer: SMTPMailer, credentials: Credentials | None = None) -> None:
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
        self._poller = _Poller()
        # The next message, whose MAIL, RCPT and DATA went out after the
        # last message's final dot (see send()'s ``then``); replies unread.
        self._ahead: _Ahead | None = None
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
        self._ahead = None
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
        in an unknown state, when the relay has closed the connection (or
        said anything) since its last reply, and while the commands of a
        message sent ahead (see :meth:`send`) wait for it.
        """
        smtp = self._smtp
        if smtp is None or smtp.sock is None or self._ahead is not None:
            return False
        if self._poller.readable(smtp.sock):
            return False
        self._quiet_at = time.monotonic()
        return True

    @property
    def sends_ahead(self) -> bool:
        """True when :meth:`send` can send the next message's commands ahead (``then``)."""
        return self._mailer.pipelining and "pipelining" in self.features

    @property
    def pending(self) -> bool:
        """True while the commands of a message sent ahead wait for its :meth:`send`."""
        return self._ahead is not None

    def _drop(self) -> None:
        self._ahead = None
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def close(self) -> None:
        """Say QUIT (briefly, ignoring any failure) and close the connection."""
        smtp = self._smtp
        if smtp is None:
            return
        try:
            # With a message sent ahead the relay takes what follows its 354
            # as message data: only closing ends that transaction.
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
        if smtp is None or self._ahead is not None:
            self._drop()
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
        return mail_parameters(envelope, data, self.features, self.max_size, self._where)

    def send(
        self,
        envelope: Envelope,
        data: bytes,
        *,
        retry_stale: bool = True,
        then: tuple[Envelope, bytes] | None = None,
    ) -> SendResult:
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
            then: the next message (envelope, data) to send on this
                connection.  With PIPELINING its ``MAIL``, ``RCPT`` and
                ``DATA`` go out in the same write as this message's final
                dot (RFC 2920 3.1), saving a write, a read and a round trip
                per message.  The next call must then be ``send()`` for
                that message, with the same two objects; anything else
                closes the connection first (after a 354 the relay would
                take any command as message data).  The relay gets nothing
                of the next message's data before that call, so a failure
                in between never delivers it.

        Returns:
            The :class:`~mailspool.result.SendResult`; at least one recipient
            was accepted.

        Raises:
            RecipientsRefused: no recipient was accepted (after RSET the
                connection stays usable).
            DeliveryError: the classified failure; the connection is closed
                when the failure left the session in an unknown state.  If
                reconnecting fails, the error of the new connection
                (``RelayUnavailable``, ``TLSFailure``...), about the relay.
                A failure at or after ``DATA`` (``DATA`` or the message
                refused, the session lost on the way) carries a ``.result``
                (:func:`~mailspool.result.with_result`): the refusal's reply
                for every recipient accepted at ``RCPT`` (none for a lost
                session), and each ``RCPT`` refusal with its own reply.
        """
        ahead, self._ahead = self._ahead, None
        written = ahead is not None and ahead.envelope is envelope and ahead.data is data
        if ahead is not None and not written:
            log.debug("relay %s: a message sent ahead was not sent; reconnecting", self._where)
            self._drop()
            self._open()
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            raise ConnectionFailed(f"the connection to {self._where} is closed")
        options: list[str] | None = None
        if ahead is not None and written:
            data, options = ahead.wire, ahead.options
        else:
            data = wire_bytes(data)
        stale_ok = retry_stale and self._reused
        if (
            stale_ok
            and not written  # its replies are there to read
            and time.monotonic() - self._quiet_at >= _QUIET_FOR
            and self._poller.readable(smtp.sock)
        ):
            # Closed (or a 421 said) while idle: no need to try MAIL first.
            self._reopen("seen before MAIL")
            stale_ok = False
        try:
            return self._send(
                envelope, data, stale_ok=stale_ok, written=written, then=then, options=options
            )
        except _Stale as stale:
            self._reopen(str(stale.error))
            return self._send(envelope, data, stale_ok=False, then=then)

    def _send(
        self,
        envelope: Envelope,
        data: bytes,
        *,
        stale_ok: bool,
        written: bool = False,
        then: tuple[Envelope, bytes] | None = None,
        options: list[str] | None = None,
    ) -> SendResult:
        smtp = self._smtp
        assert smtp is not None
        if options is None:
            options = self.check(envelope, data)
        try:
            return self._transaction(smtp, envelope, data, options, stale_ok, written, then)
        except (DeliveryError, _Stale):
            raise
        except BaseException:
            self._drop()
            raise

    def _reply(self, smtp: smtplib.SMTP, phase: str, *, stale_ok: bool = False) -> tuple[int, str]:
        """Read one reply; network failures are classified.

        With ``stale_ok`` a failure is wrapped in :class:`_Stale` (safe to retry).
        """
        started = time.monotonic()
        try:
            code, raw = smtp.getreply()
        except OSError as exc:
            raise self._failed(exc, phase, stale_ok) from exc
        if code < 100:
            self._drop()
            error = ConnectionFailed(f"{self._where} sent a malformed reply to {phase}: {raw!r}")
            raise _Stale(error) if stale_ok else error
        self.waited += time.monotonic() - started
        return code, reply_text(raw)

    def _command(
        self, smtp: smtplib.SMTP, cmd: str, args: str, phase: str, *, stale_ok: bool = False
    ) -> tuple[int, str]:
        """Send one command and read its reply (see :meth:`_reply`)."""
        try:
            smtp.putcmd(cmd, args)
        except OSError as exc:
            raise self._failed(exc, phase, stale_ok) from exc
        return self._reply(smtp, phase, stale_ok=stale_ok)

    def _pipeline(
        self, smtp: smtplib.SMTP, envelope: Envelope, mail: str, stale_ok: bool
    ) -> tuple[int, str]:
        """Write ``MAIL``, every ``RCPT`` and ``DATA`` at once (RFC 2920); return MAIL's reply.

        The replies to ``RCPT`` and ``DATA`` are left to be read in order.
        A failure to write is a failure at ``MAIL``: the relay cannot have
        accepted a transaction whose first reply nobody read.
        """
        try:
            smtp.send(_group(envelope, mail).encode(smtp.command_encoding))
        except OSError as exc:
            raise self._failed(exc, "MAIL FROM", stale_ok) from exc
        return self._reply(smtp, "MAIL FROM", stale_ok=stale_ok)

    def _group_ahead(self, then: tuple[Envelope, bytes] | None) -> tuple[bytes, _Ahead | None]:
        """The pipelined commands of the message ``then``, and what they are for.

        None are sent ahead for a message this relay would refuse before
        ``MAIL`` (:meth:`check`): its own send() raises that error.
        """
        if then is None:
            return b"", None
        envelope, data = then
        wire = wire_bytes(data)
        try:
            options = self.check(envelope, wire)
        except DeliveryError:
            return b"", None
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        group = _group(envelope, _mail_args(envelope, options)).encode(encoding)
        return group, _Ahead(envelope, data, wire, options)

    def _drain_pipeline(self, smtp: smtplib.SMTP, left: int) -> None:
        """Read the ``left`` replies still due after a refused ``MAIL`` or all ``RCPT``.

        The last is DATA's.  A relay that took ``DATA`` (354) with nothing
        to deliver to gets an empty message: the lone final dot RFC 2920
        3.1 asks for, which it must refuse or deliver to no one.
        """
        code = 0
        try:
            for _ in range(left):
                code, _text = self._reply(smtp, "a pipelined command")
                if code == 421:
                    self._drop()
                    return
            if code == 354:
                smtp.send(b".\r\n")
                self._reply(smtp, "the empty message")
        except OSError:
            self._drop()
        except DeliveryError:
            pass  # the session was closed; the refusal that led here is what counts

    def _transaction(
        self,
        smtp: smtplib.SMTP,
        envelope: Envelope,
        data: bytes,
        options: list[str],
        stale_ok: bool,
        written: bool = False,
        then: tuple[Envelope, bytes] | None = None,
    ) -> SendResult:
        """One transaction; ``written``: its commands went out ahead (see send())."""
        sock = smtp.sock
        assert sock is not None
        _set_timeout(sock, self._mailer.timeout)
        smtp.command_encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        self._reused = True
        # Commands sent ahead mean a session that pipelines: replies come in order.
        pipelined = written or self.sends_ahead

        # MAIL: a failure here means nothing of the message was transmitted
        # (pipelined or not, the data only follows DATA's 354).
        if written:  # with the last message's final dot
            code, text = self._reply(smtp, "MAIL FROM", stale_ok=stale_ok)
        elif pipelined:
            code, text = self._pipeline(smtp, envelope, _mail_args(envelope, options), stale_ok)
        else:
            mail = _mail_args(envelope, options)
            code, text = self._command(smtp, "MAIL", mail, "MAIL FROM", stale_ok=stale_ok)
        if not 200 <= code < 300:
            error = error_for_reply(code, text, phase="mail")
            if code == 421:
                self._drop()
                if stale_ok:
                    raise _Stale(error)
                raise error
            if pipelined:
                self._drain_pipeline(smtp, len(envelope.recipients) + 1)
            self._reset(code)
            raise error

        accepted: list[str] = []
        refused: dict[str, Reply] = {}
        for rcpt in envelope.recipients:
            if pipelined:
                code, text = self._reply(smtp, "RCPT TO")
            else:
                code, text = self._command(smtp, "RCPT", f"TO:<{rcpt}>", "RCPT TO")
            if 200 <= code < 300:
                accepted.append(rcpt)
            elif code == 421:
                self._drop()
                raise error_for_reply(code, text, recipient=rcpt, phase="rcpt")
            else:
                # RFC 5321 4.5.3.1.10: 552 at RCPT means "too many", i.e. 452.
                refused[rcpt] = Reply(452 if code == 552 else code, text)
        if not accepted:
            if pipelined:
                self._drain_pipeline(smtp, 1)
            self._reset(code)
            raise all_refused(envelope.recipients, refused)

        try:
            reply = self._data(smtp, sock, data, pipelined=pipelined, then=then)
        except DeliveryError as exc:
            # Only the recipients accepted at RCPT were in this transaction:
            # the error answers for them, the RCPT refusals keep their own.
            with_result(exc, envelope.recipients, accepted, refused)
            raise
        self.transactions += 1
        result = SendResult(tuple(accepted), MappingProxyType(refused), reply)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "relay %s took the message for %d of %d recipient(s): %s",
                self._where,
                len(accepted),
                len(envelope.recipients),
                result.reply,
            )
        return result

    def _data(
        self,
        smtp: smtplib.SMTP,
        sock: socket.socket,
        data: bytes,
        *,
        pipelined: bool,
        then: tuple[Envelope, bytes] | None = None,
    ) -> Reply:
        """``DATA`` (or its pipelined reply), the message, the final dot; return the 2xx reply.

        With ``pipelined`` and ``then``, the next message's commands follow
        the final dot in the same write; once the reply to the dot is read
        and the session goes on, they wait for ``then``'s send().

        Raises:
            DeliveryError: ``DATA`` or the message refused, or the session
                failed on the way (classified; the connection is closed when
                its state is unknown).
        """
        if pipelined:
            code, text = self._reply(smtp, "DATA")
        else:
            code, text = self._command(smtp, "DATA", "", "DATA")
        if code != 354:
            self._reset(code)
            raise error_for_reply(code, text, phase="data")

        ahead, sent_ahead = self._group_ahead(then) if pipelined else (b"", None)
        try:
            if len(data) < _BLOCK:  # the usual case: one write, with what goes ahead
                smtp.send(dot_stuff(data, ahead))
            else:
                payload = memoryview(dot_stuff(data))
                for start in range(0, len(payload), _BLOCK):
                    smtp.send(payload[start : start + _BLOCK])
                if ahead:
                    smtp.send(ahead)
            if ahead and _QUICKACK is not None:
                # The relay answers the final dot, then the commands sent
                # ahead.  One that writes each reply on its own without
                # TCP_NODELAY holds the later ones until this end ACKs the
                # first, which it would delay by up to 40 ms (Linux).  (Not
                # contextlib.suppress: three more calls per message.)
                try:  # noqa: SIM105
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except OSError:
                    pass
        except OSError as exc:
            # The final dot was not (completely) sent: nothing was delivered.
            raise self._translate(exc, "the message data") from exc
        try:
            # The long wait: a relay may take minutes to queue the message
            # (RFC 5321 4.5.3.2.6), and giving up early duplicates it.
            _set_timeout(sock, self._mailer.data_timeout)
            started = time.monotonic()
            code, raw = smtp.getreply()
            self.waited += time.monotonic() - started
        except OSError as exc:
            raise self._translate(exc, "the reply after the final dot", maybe_sent=True) from exc
        if smtp.sock is not None:
            _set_timeout(sock, self._mailer.timeout)
        text = reply_text(raw)
        if code < 100:
            self._drop()
            raise ConnectionFailed(
                f"{self._where} sent a malformed reply after the final dot: {raw!r}; "
                "the message may have been delivered"
            )
        if code == 421:
            self._drop()
        elif ahead:
            self._ahead = sent_ahead  # also after a refusal: the session goes on
        if not 200 <= code < 300:
            raise error_for_reply(code, text, phase="data")
        return Reply(code, text)

    def _reset(self, code: int) -> None:
        """After a refused step: RSET, or close when the session cannot go on."""
        if code == 421 or code < 0:
            self._drop()
            return
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
