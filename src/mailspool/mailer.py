"""Mailers: the code that hands a message to a relay, now, with no transaction.

Theory of operation
-------------------

:class:`SMTPMailer` speaks SMTP through the standard library's
:mod:`smtplib`, but drives the transaction itself (``MAIL``, one ``RCPT``
per recipient, ``DATA``) instead of calling ``sendmail()``, for three
reasons:

* every recipient's reply is kept (``sendmail()`` only reports refusals when
  some were accepted, and raises without them otherwise), so the caller
  learns exactly who got the message (:class:`SendResult`);
* each phase gets its own socket timeout: the short ones for commands, the
  long one (10 minutes by default, as RFC 5321 4.5.3.2 asks) for the reply
  after the final dot, because giving up early there is what causes
  duplicate deliveries;
* failures are classified where they happen (:mod:`mailspool.errors`):
  about the relay or our configuration (``about_relay``: greeting, TLS,
  AUTH, 421) or about this message; transient or permanent.

One :class:`SMTPConnection` carries many messages.  After a refused
transaction it sends ``RSET`` and stays usable; after anything that leaves
the session in an unknown state (a timeout, a lost connection, a 421, a
garbled reply) it is closed and never used again.  :class:`SMTPMailer`
keeps one connection per thread, checks before each message that the relay
has not closed it while idle, and reconnects transparently; if the relay
closes it just as a new message starts (a drop or a 421 in answer to
``MAIL``, when nothing of the message was transmitted) it reconnects and
tries once more.

Secure by default: TLS is required (``starttls``) unless ``implicit`` TLS
or ``none`` is chosen; certificates and host names are checked with
``ssl.create_default_context()``; AUTH is never sent without TLS unless
``allow_plaintext_auth=True``; the password never appears in a repr, a log
line or an error.

:class:`SendmailMailer` pipes the message to a local ``sendmail -i``
(Postfix and Exim ship one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import smtplib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from functools import lru_cache
from types import MappingProxyType, TracebackType
from typing import Literal, NoReturn

from zope.interface import implementer

from mailspool.errors import (
    AuthenticationError,
    ConnectionFailed,
    DeliveryError,
    MessageTooLarge,
    PermanentError,
    RecipientsRefused,
    RelayUnavailable,
    SMTPTimeout,
    SMTPUTF8Required,
    TLSFailure,
    TransientError,
    enhanced_code,
    error_for_reply,
)
from mailspool.interfaces import ISendmailMailer, ISMTPMailer
from mailspool.message import Envelope, make_envelope, to_wire

__all__ = [
    "MessageInput",
    "Reply",
    "SMTPConnection",
    "SMTPMailer",
    "SendResult",
    "SendmailMailer",
    "TLSMode",
]

log = logging.getLogger(__name__)

#: How TLS is used: required STARTTLS, implicit TLS (SMTPS), or none at all.
TLSMode = Literal["starttls", "implicit", "none"]
_TLS_MODES = ("starttls", "implicit", "none")

#: What ``send()`` accepts as a message.
MessageInput = bytes | str | Message

# Message data is written in blocks, each with the command timeout, so that
# a large message on a slow link is not cut off by one total deadline
# (socket.sendall's timeout covers the whole call).
_BLOCK = 256 * 1024
_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")
#: AUTH mechanisms in order of preference.  Under TLS, PLAIN is the standard;
#: CRAM-MD5 (historic, RFC 8314 era) only when nothing else is offered.
_AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


# --- outcomes -----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One SMTP reply.

    Attributes:
        code: the three-digit reply code.
        text: the reply text (lines of a multi-line reply joined by ``\\n``).
    """

    code: int
    text: str

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code (``"5.1.1"``) or ``None``."""
        return enhanced_code(self.text)

    @property
    def transient(self) -> bool:
        """True for a 4xx reply: trying again later may succeed."""
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class SendResult:
    """What became of one message, recipient by recipient.

    Attributes:
        accepted: the recipients the relay took (2xx at ``RCPT`` and a 2xx
            reply after the data).
        refused: recipient -> :class:`Reply` for every recipient refused at
            ``RCPT``, 4xx and 5xx alike.  A 552 there is recorded as 452
            (RFC 5321 4.5.3.1.10: too many recipients, try the rest later).
        reply: the reply after the final dot; ``None`` when no data was sent.
    """

    accepted: tuple[str, ...]
    refused: Mapping[str, Reply] = field(default_factory=lambda: MappingProxyType({}))
    reply: Reply | None = None


# --- helpers ------------------------------------------------------------------


@lru_cache(maxsize=1)
def _default_local_hostname() -> str:
    # What smtplib would send, computed once instead of at every connection.
    fqdn = socket.getfqdn()
    if "." in fqdn:
        return fqdn
    try:
        return f"[{socket.gethostbyname(socket.gethostname())}]"
    except OSError:
        return "[127.0.0.1]"


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _wire(data: bytes) -> bytes:
    """``data`` as CRLF-only bytes ending in CRLF (unchanged when already so)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf or not data.endswith(b"\r\n"):
        return to_wire(data)
    return data


def _dot_stuff(data: bytes) -> bytes:
    """Double a dot that starts a line (RFC 5321 4.5.2) and add the final dot."""
    if data.startswith(b".") or b"\n." in data:
        data = _DOT_AT_LINE_START.sub(b"..", data)
    return data + b".\r\n"


def _readable(sock: socket.socket) -> bool:
    """True when the peer sent something (or closed) while we expected silence."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        ready, _, _ = select.select([sock], [], [], 0)
        return bool(ready)
    except (OSError, ValueError):
        return True


class _Stale(Exception):
    """The relay dropped a reused connection before the transaction began.

    Raised by :meth:`SMTPConnection._send` when asked to; nothing of the
    message was transmitted, so it is safe to reconnect and send again.
    """

    def __init__(self, error: DeliveryError) -> None:
        super().__init__(str(error))
        self.error = error


# --- the SMTP mailer ---------------------------------------------------------


@implementer(ISMTPMailer)
class SMTPMailer:
    """Sends mail to an SMTP relay: TLS, AUTH, connection reuse, per-recipient outcomes.

    Args:
        host: the relay's host name (also the name its certificate must carry).
        port: the relay's port; default 25, or 465 with ``tls="implicit"``.
        username: the user name for AUTH, or ``None`` for no AUTH.
        password: the password for AUTH (never shown anywhere).
        tls: ``"starttls"`` (the default; the relay must offer STARTTLS),
            ``"implicit"`` (TLS from the first byte, RFC 8314) or ``"none"``.
        ca_file: a PEM bundle of CAs to trust instead of the system's.
        verify_certificates: ``False`` turns certificate and host name
            checks off (the only way to do so; logged as a warning).
        ssl_context: a ready ``ssl.SSLContext`` to use instead of the one
            built from ``ca_file``/``verify_certificates``.
        allow_plaintext_auth: allow AUTH over a connection without TLS
            (exposes the password to anyone on the path).
        connect_timeout: seconds for the TCP connection, the implicit TLS
            handshake and the relay's greeting.
        timeout: seconds for each command's reply (EHLO, STARTTLS, AUTH,
            MAIL, RCPT, DATA, RSET, QUIT) and for each block of message data.
        data_timeout: seconds to wait for the reply after the final dot
            (RFC 5321 asks for 10 minutes: a shorter wait causes duplicates).
        local_hostname: the name sent with EHLO; default this host's FQDN.
        reuse_connections: keep each thread's connection open for its next
            message (default); ``False`` closes it after every ``send``.

    Raises:
        ValueError: for an unknown ``tls`` mode, a password without a user
            name (or the reverse), a non-ASCII user name or password (smtplib's
            AUTH is ASCII only), AUTH without TLS when
            ``allow_plaintext_auth`` is not set, or an unreadable ``ca_file``.
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TLSMode = "starttls",
        ca_file: str | os.PathLike[str] | None = None,
        verify_certificates: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        allow_plaintext_auth: bool = False,
        connect_timeout: float = 60.0,
        timeout: float = 300.0,
        data_timeout: float = 600.0,
        local_hostname: str | None = None,
        reuse_connections: bool = True,
    ) -> None:
        if tls not in _TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(_TLS_MODES)}; got {tls!r}")
        if (username is None) != (password is None):
            raise ValueError("username and password must be given together")
        if not ((username or "").isascii() and (password or "").isascii()):
            # smtplib encodes AUTH exchanges as ASCII; say so now, not at send time
            # (and never inside an exception that would carry the password).
            raise ValueError("the user name and password must be ASCII for SMTP AUTH")
        if username is not None and tls == "none" and not allow_plaintext_auth:
            raise ValueError(
                "AUTH without TLS would send the password in clear text: use "
                "tls='starttls' or tls='implicit', or pass allow_plaintext_auth=True"
            )
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("timeout", timeout),
            ("data_timeout", data_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds; got {value!r}")
        self.host = host
        self.port = port if port is not None else (465 if tls == "implicit" else 25)
        self.username = username
        self._password = password
        self.tls: TLSMode = tls
        self.ca_file = os.fspath(ca_file) if ca_file is not None else None
        self.verify_certificates = verify_certificates
        self.allow_plaintext_auth = allow_plaintext_auth
        self.connect_timeout = float(connect_timeout)
        self.timeout = float(timeout)
        self.data_timeout = float(data_timeout)
        self.local_hostname = local_hostname
        self.reuse_connections = reuse_connections
        self.ssl_context = ssl_context if ssl_context is not None else self._make_context()
        self._local = threading.local()

    @property
    def hostname(self) -> str:
        """The relay's host name (the name ``ISMTPMailer`` uses)."""
        return self.host

    def _make_context(self) -> ssl.SSLContext | None:
        if self.tls == "none":
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load ca_file {self.ca_file!r}: {exc}") from exc
        if not self.verify_certificates:
            log.warning(
                "TLS certificate verification is OFF for %s:%d (verify_certificates=False)",
                self.host,
                self.port,
            )
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def __repr__(self) -> str:
        auth = "" if self.username is None else f", username={self.username!r}, password=<hidden>"
        return f"SMTPMailer(host={self.host!r}, port={self.port}, tls={self.tls!r}{auth})"

    # -- connections --------------------------------------------------------

    def connect(self) -> SMTPConnection:
        """Open a new connection: greeting read, EHLO sent, TLS up, AUTH done.

        The connection is the caller's (use it as a context manager); it is
        not the thread's connection that :meth:`send` reuses.

        Raises:
            RelayUnavailable: cannot connect, no or a 4xx/5xx greeting, 421.
            TLSFailure: STARTTLS not offered or refused, certificate not
                trusted or not for this host, handshake failed.
            AuthenticationError: AUTH not offered, no common mechanism,
                credentials refused (535), AUTH required (530).
        """
        return SMTPConnection(self, self._password)

    def _thread_connection(self) -> tuple[SMTPConnection, bool]:
        """This thread's connection, alive, and whether it was opened just now."""
        conn: SMTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            if conn.alive:
                return conn, False
            log.debug("connection to %s:%d is gone; reconnecting", self.host, self.port)
            conn.close()
        self._local.conn = None
        conn = self.connect()
        self._local.conn = conn
        return conn, True

    def _release(self, conn: SMTPConnection) -> None:
        """Forget (and close) ``conn`` if it cannot or should not be reused."""
        if conn.alive and self.reuse_connections:
            return
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    # -- IMailer ------------------------------------------------------------

    def send(
        self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput
    ) -> SendResult:
        """Send a message now and report what became of each recipient.

        ``message`` may be ``bytes``, ``str`` or an ``email.message.Message``;
        line endings are normalised to CRLF (a bare LF never reaches the
        wire).  The calling thread's connection is reused, and reopened if
        the relay closed it.

        Returns:
            The :class:`SendResult`: at least one recipient was accepted;
            the others are in ``refused`` with their replies.

        Raises:
            InvalidAddress, InvalidMessage: bad input (``ValueError``).
            RecipientsRefused: no recipient was accepted; ``.result`` has
                every reply, ``.transient`` tells whether any was a 4xx.
            DeliveryError: any other failure, classified (see
                :mod:`mailspool.errors` and docs/mailer.md).
        """
        return self.send_envelope(make_envelope(fromaddr, toaddrs), to_wire(message))

    def send_envelope(self, envelope: Envelope, data: bytes) -> SendResult:
        """Like :meth:`send` for an already validated envelope and wire bytes.

        This is the queue processor's path: ``data`` is what
        :func:`mailspool.message.to_wire` produced (CRLF line endings; other
        line endings are normalised anyway).
        """
        conn, fresh = self._thread_connection()
        try:
            try:
                return conn._send(envelope, data, stale_ok=not fresh)
            except _Stale as stale:
                log.info(
                    "relay %s:%d closed an idle connection (%s); reconnecting",
                    self.host,
                    self.port,
                    stale.error,
                )
                conn.close()
                conn, _ = self._thread_connection()
                return conn._send(envelope, data, stale_ok=False)
        finally:
            self._release(conn)

    def vote(self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput) -> None:
        """Check, before a transaction commits, that the message can be sent.

        Validates the input, opens (or checks with NOOP) this thread's
        connection, and checks the message against what the relay offers
        (SMTPUTF8, 8BITMIME, SIZE).  The connection is kept for the next
        :meth:`send` in this thread; :meth:`abort` drops it.

        Raises:
            the errors :meth:`connect` raises, ``SMTPUTF8Required``,
            ``MessageTooLarge``, ``PermanentError`` (8-bit data without
            8BITMIME), ``InvalidAddress``, ``InvalidMessage``.
        """
        envelope = make_envelope(fromaddr, toaddrs)
        data = to_wire(message)
        conn, fresh = self._thread_connection()
        if not fresh and not conn.noop():
            conn, _ = self._thread_connection()
        conn.check(envelope, data)

    def abort(self) -> None:
        """Close and forget the connection :meth:`vote` opened in this thread."""
        conn: SMTPConnection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close this thread's connection (another thread's is left alone)."""
        self.abort()


class SMTPConnection:
    """One SMTP session with a relay, ready for any number of messages.

    Made by :meth:`SMTPMailer.connect`; not safe to share between threads.
    Use it as a context manager, or call :meth:`close`.

    Attributes:
        host, port: the relay.
        features: the ESMTP keywords the relay offered after TLS (lower case).
        max_size: the relay's SIZE limit in octets, or ``None``.
        transactions: how many messages this connection delivered.
    """

    def __init__(self, mailer: SMTPMailer, password: str | None = None) -> None:
        self._mailer = mailer
        self.host = mailer.host
        self.port = mailer.port
        self.transactions = 0
        self.features: dict[str, str] = {}
        self.max_size: int | None = None
        self._smtp: smtplib.SMTP | None = None
        smtp = self._connect()
        try:
            self._smtp = smtp
            self._setup(smtp, password)
        except BaseException:
            self._drop()
            raise
        log.debug(
            "connected to %s (tls=%s, auth=%s)",
            self._where,
            mailer.tls,
            mailer.username is not None,
        )

    @property
    def _where(self) -> str:
        return f"{self.host}:{self.port}"

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

    # -- opening ------------------------------------------------------------

    def _connect(self) -> smtplib.SMTP:
        m = self._mailer
        local = m.local_hostname or _default_local_hostname()
        try:
            if m.tls == "implicit":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    m.host,
                    m.port,
                    local_hostname=local,
                    timeout=m.connect_timeout,
                    context=m.ssl_context,
                )
            else:
                smtp = smtplib.SMTP(m.host, m.port, local_hostname=local, timeout=m.connect_timeout)
        except smtplib.SMTPConnectError as exc:
            raise error_for_reply(
                exc.smtp_code,
                f"{_text(exc.smtp_error)} [greeting of {self._where}]",
                phase="greeting",
            ) from exc
        except smtplib.SMTPServerDisconnected as exc:
            if isinstance(exc.__context__, TimeoutError):
                text = f"no greeting from {self._where} within {m.connect_timeout:g} s"
            else:
                text = f"{self._where} closed the connection before its greeting"
            raise RelayUnavailable(text) from exc
        except ssl.SSLCertVerificationError as exc:
            raise self._cert_failure(exc) from exc
        except ssl.SSLError as exc:
            raise TLSFailure(f"TLS handshake with {self._where} failed: {exc}") from exc
        except TimeoutError as exc:
            raise RelayUnavailable(
                f"connecting to {self._where} timed out after {m.connect_timeout:g} s"
            ) from exc
        except OSError as exc:
            raise RelayUnavailable(
                f"cannot connect to {self._where}: {exc.strerror or exc}"
            ) from exc
        self._tune(smtp)
        return smtp

    def _tune(self, smtp: smtplib.SMTP) -> None:
        sock = smtp.sock
        if sock is None:  # pragma: no cover - smtplib always sets it on success
            raise ConnectionFailed(f"no socket after connecting to {self._where}")
        sock.settimeout(self._mailer.timeout)
        # MAIL/RCPT/DATA each wait for their reply, so Nagle's algorithm
        # would only ever delay the last block of a message.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _cert_failure(self, exc: ssl.SSLCertVerificationError) -> TLSFailure:
        reason = exc.verify_message or str(exc)
        return TLSFailure(
            f"certificate of {self._where} was not accepted: {reason}; trust its CA "
            "with ca_file=..., or turn checks off with verify_certificates=False"
        )

    def _setup(self, smtp: smtplib.SMTP, password: str | None) -> None:
        m = self._mailer
        needs_esmtp = m.tls == "starttls" or m.username is not None
        self._hello(smtp, allow_helo=not needs_esmtp)
        if m.tls == "starttls":
            if not smtp.has_extn("starttls"):
                raise TLSFailure(
                    f"{self._where} does not offer STARTTLS, and TLS is required "
                    "(tls='starttls'); nothing was sent.  Use tls='implicit' for "
                    "an SMTPS port, or tls='none' only for a trusted local relay"
                )
            try:
                smtp.starttls(context=self._mailer.ssl_context)
            except smtplib.SMTPResponseException as exc:
                text = f"{_text(exc.smtp_error)} [STARTTLS to {self._where}]"
                if exc.smtp_code == 421:
                    raise error_for_reply(421, text, phase="starttls") from exc
                # Any other refusal (454 "TLS not available", 5xx) is a TLS
                # failure, whatever the code would mean after AUTH.
                raise TLSFailure(text, code=exc.smtp_code) from exc
            except ssl.SSLCertVerificationError as exc:
                raise self._cert_failure(exc) from exc
            except ssl.SSLError as exc:
                raise TLSFailure(f"TLS handshake with {self._where} failed: {exc}") from exc
            except OSError as exc:
                raise self._translate(exc, "STARTTLS", relay=True) from exc
            self._hello(smtp, allow_helo=False)
        if m.username is not None:
            self._login(smtp, m.username, password or "")
        self.features = dict(smtp.esmtp_features)
        size = self.features.get("size", "").split()
        if size and size[0].isdigit() and int(size[0]) > 0:
            self.max_size = int(size[0])

    def _hello(self, smtp: smtplib.SMTP, *, allow_helo: bool) -> None:
        try:
            code, reply = smtp.ehlo()
            if not 200 <= code < 300 and allow_helo and code != 421:
                code, reply = smtp.helo()
        except OSError as exc:
            raise self._translate(exc, "EHLO", relay=True) from exc
        if not 200 <= code < 300:
            raise error_for_reply(code, f"{_text(reply)} [EHLO to {self._where}]", phase="ehlo")

    def _login(self, smtp: smtplib.SMTP, username: str, password: str) -> None:
        m = self._mailer
        encrypted = isinstance(smtp.sock, ssl.SSLSocket)
        if not encrypted and not m.allow_plaintext_auth:
            # Unreachable through SMTPMailer's checks; kept as the last guard.
            raise TLSFailure(f"refusing to send AUTH to {self._where} without TLS")
        if not smtp.has_extn("auth"):
            raise AuthenticationError(
                f"{self._where} does not offer AUTH"
                + ("" if encrypted else " (over a connection without TLS)")
            )
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        mechanism = next((m for m in _AUTH_MECHANISMS if m in offered), None)
        if mechanism is None:
            raise AuthenticationError(
                f"no AUTH mechanism in common with {self._where}: it offers "
                f"{' '.join(offered) or 'none'}; mailspool supports {', '.join(_AUTH_MECHANISMS)}"
            )
        # One mechanism, one attempt: smtplib's login() would try the next
        # mechanism after a refusal, sending a wrong password again (and
        # counting twice towards the account's lockout).
        smtp.user, smtp.password = username, password
        answer = getattr(smtp, "auth_" + mechanism.lower().replace("-", "_"))
        try:
            smtp.auth(mechanism, answer)
        except smtplib.SMTPResponseException as exc:
            raise error_for_reply(exc.smtp_code, _text(exc.smtp_error), phase="auth") from None
        except smtplib.SMTPServerDisconnected as exc:
            raise self._translate(exc, "AUTH", relay=True) from None
        except smtplib.SMTPException as exc:  # e.g. endless challenges
            raise AuthenticationError(
                f"AUTH {mechanism} with {self._where} failed: {exc}"
            ) from None
        except OSError as exc:
            raise self._translate(exc, "AUTH", relay=True) from None
        finally:
            # smtplib keeps the credentials on the object; do not.
            smtp.user = smtp.password = ""

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
        return not _readable(smtp.sock)

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

        Raises:
            SMTPUTF8Required: an address is not ASCII and the relay does not
                offer SMTPUTF8.
            PermanentError: the data has 8-bit bytes and the relay offers
                neither 8BITMIME nor SMTPUTF8.
            MessageTooLarge: the message is larger than the relay's SIZE.
        """
        f = self.features
        options: list[str] = []
        if envelope.smtputf8:
            if "smtputf8" not in f:
                wide = [a for a in (envelope.sender, *envelope.recipients) if not a.isascii()]
                raise SMTPUTF8Required(
                    f"{self._where} does not offer SMTPUTF8, which the non-ASCII "
                    f"address(es) {', '.join(wide)} need; the message cannot be "
                    "sent through this relay"
                )
            options.append("SMTPUTF8")
        if not data.isascii():
            end = data.find(b"\r\n\r\n")
            headers = data if end < 0 else data[:end]
            if not headers.isascii() and "smtputf8" in f and "SMTPUTF8" not in options:
                # RFC 6532 headers: use SMTPUTF8 when offered; otherwise
                # BODY=8BITMIME below, which most relays accept.
                options.append("SMTPUTF8")
            if "8bitmime" in f:
                options.append("BODY=8BITMIME")
            elif "SMTPUTF8" not in options:
                raise PermanentError(
                    f"the message has 8-bit content and {self._where} does not offer "
                    "8BITMIME; encode the body as quoted-printable or base64"
                )
        if self.max_size is not None and len(data) > self.max_size:
            raise MessageTooLarge(
                f"the message is {len(data)} octets and {self._where} accepts "
                f"at most {self.max_size} (SIZE)",
                enhanced="5.3.4",
            )
        if "size" in f:
            options.append(f"SIZE={len(data)}")
        return options

    def send(self, envelope: Envelope, data: bytes) -> SendResult:
        """Send one message over this connection.

        Args:
            envelope: the validated envelope (:func:`mailspool.message.make_envelope`).
            data: the message as :func:`mailspool.message.to_wire` returns it
                (other line endings are normalised, never sent as they are).

        Returns:
            The :class:`SendResult`; at least one recipient was accepted.

        Raises:
            RecipientsRefused: no recipient was accepted (after RSET the
                connection stays usable).
            DeliveryError: the classified failure; the connection is closed
                when the failure left the session in an unknown state.
        """
        return self._send(envelope, data, stale_ok=False)

    def _send(self, envelope: Envelope, data: bytes, *, stale_ok: bool) -> SendResult:
        smtp = self._smtp
        if smtp is None or smtp.sock is None:
            raise ConnectionFailed(f"the connection to {self._where} is closed")
        data = _wire(data)
        options = self.check(envelope, data)
        try:
            return self._transaction(smtp, envelope, data, options, stale_ok)
        except (DeliveryError, _Stale):
            raise
        except BaseException:
            self._drop()
            raise

    def _command(
        self, smtp: smtplib.SMTP, cmd: str, args: str, phase: str, *, stale_ok: bool = False
    ) -> tuple[int, str]:
        """Send one command and read its reply; network failures are classified.

        With ``stale_ok`` a failure is wrapped in :class:`_Stale` (safe to retry).
        """
        error: DeliveryError
        try:
            smtp.putcmd(cmd, args)
            code, raw = smtp.getreply()
        except OSError as exc:
            error = self._translate(exc, phase)
            if stale_ok:
                raise _Stale(error) from exc
            raise error from exc
        if code < 100:
            self._drop()
            error = ConnectionFailed(f"{self._where} sent a malformed reply to {phase}: {raw!r}")
            raise _Stale(error) if stale_ok else error
        return code, _text(raw)

    def _transaction(
        self,
        smtp: smtplib.SMTP,
        envelope: Envelope,
        data: bytes,
        options: list[str],
        stale_ok: bool,
    ) -> SendResult:
        sock = smtp.sock
        assert sock is not None
        timeout = self._mailer.timeout
        sock.settimeout(timeout)
        smtp.command_encoding = "utf-8" if "SMTPUTF8" in options else "ascii"

        # MAIL: a failure here means nothing of the message was transmitted.
        params = "".join(f" {option}" for option in options)
        code, text = self._command(
            smtp, "MAIL", f"FROM:<{envelope.sender}>{params}", "MAIL FROM", stale_ok=stale_ok
        )
        if not 200 <= code < 300:
            error = error_for_reply(code, text, phase="mail")
            if code == 421 and stale_ok:
                self._drop()
                raise _Stale(error)
            self._reset(code)
            raise error

        accepted: list[str] = []
        refused: dict[str, Reply] = {}
        for rcpt in envelope.recipients:
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
            self._reset(code)
            self._refuse_all(envelope, refused)

        code, text = self._command(smtp, "DATA", "", "DATA")
        if code != 354:
            self._reset(code)
            raise error_for_reply(code, text, phase="data")

        payload = memoryview(_dot_stuff(data))
        try:
            for start in range(0, len(payload), _BLOCK):
                smtp.send(payload[start : start + _BLOCK])
        except OSError as exc:
            # The final dot was not (completely) sent: nothing was delivered.
            raise self._translate(exc, "the message data") from exc
        try:
            # The long wait: a relay may take minutes to queue the message
            # (RFC 5321 4.5.3.2.6), and giving up early duplicates it.
            sock.settimeout(self._mailer.data_timeout)
            code, raw = smtp.getreply()
        except OSError as exc:
            raise self._translate(exc, "the reply after the final dot", maybe_sent=True) from exc
        if smtp.sock is not None:
            sock.settimeout(timeout)
        text = _text(raw)
        if code < 100:
            self._drop()
            raise ConnectionFailed(
                f"{self._where} sent a malformed reply after the final dot: {raw!r}; "
                "the message may have been delivered"
            )
        if code == 421:
            self._drop()
        if not 200 <= code < 300:
            raise error_for_reply(code, text, phase="data")
        self.transactions += 1
        result = SendResult(tuple(accepted), MappingProxyType(refused), Reply(code, text))
        log.debug(
            "relay %s took the message for %d of %d recipient(s): %s",
            self._where,
            len(accepted),
            len(envelope.recipients),
            result.reply,
        )
        return result

    def _refuse_all(self, envelope: Envelope, refused: Mapping[str, Reply]) -> NoReturn:
        errors = {
            rcpt: error_for_reply(reply.code, reply.text, recipient=rcpt, phase="rcpt")
            for rcpt, reply in refused.items()
        }
        for error in errors.values():
            if error.about_relay:  # e.g. 530: a configuration problem, not the recipients
                raise error
        text = "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused.items())
        n = len(refused)
        single = next(iter(refused.values())) if n == 1 else None
        raise RecipientsRefused(
            f"{'the recipient was' if n == 1 else f'all {n} recipients were'} refused: {text}",
            result=SendResult((), MappingProxyType(dict(refused)), None),
            transient=any(e.transient for e in errors.values()),
            code=single.code if single else None,
            recipient=envelope.recipients[0] if n == 1 else None,
        )

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

    def _translate(
        self, exc: OSError, phase: str, *, relay: bool = False, maybe_sent: bool = False
    ) -> DeliveryError:
        """Turn a network-level failure into a classified error; close the connection."""
        self._drop()
        where = self._where
        timed_out = isinstance(exc, TimeoutError) or (
            isinstance(exc, smtplib.SMTPServerDisconnected)
            and isinstance(exc.__context__, TimeoutError)
        )
        note = "; the message may have been delivered" if maybe_sent else ""
        if isinstance(exc, ssl.SSLCertVerificationError):
            return self._cert_failure(exc)
        if timed_out:
            limit = self._mailer.data_timeout if maybe_sent else self._mailer.timeout
            text = f"{where} did not answer {phase} within {limit:g} s{note}"
            return RelayUnavailable(text) if relay else SMTPTimeout(text)
        if isinstance(exc, smtplib.SMTPResponseException):
            text = f"{where} sent a malformed reply to {phase}: {_text(exc.smtp_error)}{note}"
        elif isinstance(exc, smtplib.SMTPServerDisconnected):
            text = f"{where} closed the connection during {phase}{note}"
        else:
            text = f"connection to {where} failed during {phase}: {exc}{note}"
        return RelayUnavailable(text) if relay else ConnectionFailed(text)


# --- sendmail ----------------------------------------------------------------

# sysexits.h: what a sendmail binary's exit status says about retrying.
_SENDMAIL_PERMANENT = {
    64: "command line usage error",
    65: "data format error",
    66: "cannot open input",
    67: "addressee unknown",
    68: "host name unknown",
    77: "permission denied",
}
_SENDMAIL_CONFIG = {69: "service unavailable", 78: "configuration error"}


@implementer(ISendmailMailer)
class SendmailMailer:
    """Pipes each message to a local ``sendmail -i -f SENDER -- RECIPIENT...``.

    The local MTA (Postfix, Exim...) then owns the message.  Lines are
    given to it with LF endings, as local programs expect.

    Args:
        path: the sendmail binary.
        args: extra arguments, put before ``-f``.
        timeout: seconds the binary may take before it is killed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "/usr/sbin/sendmail",
        *,
        args: Sequence[str] = (),
        timeout: float = 600.0,
    ) -> None:
        self.path = os.fspath(path)
        self.args = tuple(args)
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"SendmailMailer(path={self.path!r})"

    def send(
        self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput
    ) -> SendResult:
        """Hand the message to sendmail.

        Returns:
            A :class:`SendResult` with every recipient accepted (sendmail
            reports refusals later, by bounce).

        Raises:
            InvalidAddress, InvalidMessage: bad input.
            RelayUnavailable: the binary cannot be run, or exited with
                EX_UNAVAILABLE/EX_CONFIG.
            SMTPTimeout: it did not finish in time (it was killed).
            PermanentError: it exited with a status meaning "do not retry"
                (EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_NOUSER, EX_NOHOST, EX_NOPERM).
            TransientError: any other non-zero exit status.
        """
        return self.send_envelope(make_envelope(fromaddr, toaddrs), to_wire(message))

    def send_envelope(self, envelope: Envelope, data: bytes) -> SendResult:
        """Like :meth:`send` for an already validated envelope and wire bytes."""
        argv = [self.path, "-i", *self.args, "-f", envelope.sender, "--", *envelope.recipients]
        payload = _wire(data).replace(b"\r\n", b"\n")
        try:
            proc = subprocess.run(
                argv, input=payload, capture_output=True, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise SMTPTimeout(f"{self.path} did not finish within {self.timeout:g} s") from exc
        except OSError as exc:
            raise RelayUnavailable(f"cannot run {self.path}: {exc.strerror or exc}") from exc
        status = proc.returncode
        if status == 0:
            return SendResult(envelope.recipients)
        said = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        if status < 0:
            what = f"killed by signal {-status}"
        else:
            meaning = _SENDMAIL_PERMANENT.get(status) or _SENDMAIL_CONFIG.get(status)
            what = f"exit status {status}" + (f" ({meaning})" if meaning else "")
        text = f"{self.path} failed: {what}" + (f": {said}" if said else "")
        if status in _SENDMAIL_PERMANENT:
            raise PermanentError(text)
        if status in _SENDMAIL_CONFIG:
            raise RelayUnavailable(text)
        raise TransientError(text)

    def vote(self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput) -> None:
        """Validate the input and check that the binary can be run.

        Raises:
            InvalidAddress, InvalidMessage: bad input.
            RelayUnavailable: the binary is missing or not executable.
        """
        make_envelope(fromaddr, toaddrs)
        to_wire(message)
        if not (os.path.isfile(self.path) and os.access(self.path, os.X_OK)):
            raise RelayUnavailable(f"{self.path} is not an executable file")

    def abort(self) -> None:
        """Nothing to undo: :meth:`vote` opens nothing."""
