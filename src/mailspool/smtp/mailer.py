"""Mailers: the code that hands a message to a relay, now, with no transaction.

This module is where applications find the mailers; it holds
:class:`SMTPMailer` and re-exports the rest, each of which lives in a module
of its own:

=========================  ===================================================
:class:`SMTPMailer`        here: settings, TLS context, one reused connection
                           per thread, ``send``/``vote``/``abort``
:class:`SMTPConnection`    :mod:`mailspool.smtp.session`: one session, many
                           messages, per-recipient outcomes
(opening a session)        :mod:`mailspool.smtp.handshake`: greeting, EHLO,
                           STARTTLS, AUTH
(extension rules)          :mod:`mailspool.smtp.esmtp`: SMTPUTF8, 8BITMIME, SIZE,
                           dot-stuffing (pure functions)
:class:`SendmailMailer`    :mod:`mailspool.smtp.sendmail`
:class:`Reply`,            :mod:`mailspool.smtp.result`
:class:`SendResult`
=========================  ===================================================

Secure by default: TLS is required (``starttls``) unless ``implicit`` TLS
or ``none`` is chosen; certificates and host names are checked with
``ssl.create_default_context()``, and only ``verify_certificates=False``
turns that off; AUTH is never sent without TLS unless
``allow_plaintext_auth=True``; the password never appears in a repr, a log
line or an error.

:class:`SMTPMailer` keeps one connection per thread.  Before each message
it checks that the relay has not closed it while idle and reconnects
transparently; if the relay closes it just as a new message starts (a drop
or a 421 in answer to ``MAIL``, when nothing of the message was
transmitted) the connection reconnects and tries once more
(:meth:`SMTPConnection.send`).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Iterable

from zope.interface import implementer

from mailspool.interfaces import ISMTPMailer
from mailspool.message import Envelope, make_envelope, to_wire
from mailspool.smtp.compat import TLSMode, tls_mode
from mailspool.smtp.handshake import Credentials
from mailspool.smtp.result import MessageInput, Reply, SendResult
from mailspool.smtp.sendmail import SendmailMailer
from mailspool.smtp.session import SMTPConnection

__all__ = [
    "MessageInput",
    "Reply",
    "SMTPConnection",
    "SMTPMailer",
    "SendResult",
    "SendmailMailer",
    "TLSMode",
]

log = logging.getLogger("mailspool.mailer")


def _verifies(context: ssl.SSLContext) -> bool:
    return context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def _client_cert(
    certfile: str | os.PathLike[str] | None,
    keyfile: str | os.PathLike[str] | None,
    tls: TLSMode,
    context: ssl.SSLContext | None,
) -> tuple[str, str | None] | None:
    """The client certificate and key files, checked against the other settings."""
    if certfile is None:
        if keyfile is not None:
            raise ValueError("keyfile needs certfile (the client certificate)")
        return None
    if tls == "none":
        raise ValueError("a client certificate (certfile) needs TLS, but tls is 'none'")
    if context is not None:
        raise ValueError("give either certfile or ssl_context (load the certificate into it)")
    return os.fspath(certfile), os.fspath(keyfile) if keyfile is not None else None


def _relay_host(host: str | None, hostname: str | None) -> str:
    """The relay's host, from mailspool's or the older packages' name for it."""
    if host is not None and hostname is not None and host != hostname:
        raise ValueError(f"host={host!r} and hostname={hostname!r} differ: give one of them")
    return host or hostname or "localhost"


def _ignore_debug_smtp() -> None:
    log.warning(
        "debug_smtp is ignored: smtplib's debug output would show the AUTH "
        "exchange; set the 'mailspool' loggers to DEBUG to follow each session"
    )


def _check_auth(
    username: str | None, password: str | None, tls: str, *, allow_plaintext_auth: bool
) -> None:
    """Refuse credentials that AUTH cannot use, or would send in clear text."""
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


def _check_timeouts(**timeouts: float) -> None:
    for name, value in timeouts.items():
        if not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds; got {value!r}")


def _check_context(context: ssl.SSLContext, ca_file: object, verify_certificates: bool) -> None:
    """Refuse a context given with ``ca_file``, or whose checks disagree with the flag."""
    if ca_file is not None:
        raise ValueError("give either ca_file or ssl_context (load the CAs into the context)")
    if _verifies(context) != verify_certificates:
        raise ValueError(
            "the ssl_context does not check certificates and host names; "
            "pass verify_certificates=False to say that this is intended"
            if verify_certificates
            else "verify_certificates=False, but the ssl_context checks "
            "certificates and host names; use a context that does not"
        )


class _ThreadConnection(threading.local):
    """Each thread's connection, ``None`` until it opens one."""

    conn: SMTPConnection | None = None


@implementer(ISMTPMailer)
class SMTPMailer:
    """Sends mail to an SMTP relay: TLS, AUTH, connection reuse, per-recipient outcomes.

    Args:
        host: the relay's host name (also the name its certificate must carry);
            default ``localhost``.
        port: the relay's port; default 25, or 465 with ``tls="implicit"``.
            For submission with STARTTLS (the default) use 587.  The host,
            port, user name and password may be given by position, in this
            order, as with zope.sendmail and repoze.sendmail; the rest by name.
        username: the user name for AUTH, or ``None`` for no AUTH.
        password: the password for AUTH (never shown anywhere).
        tls: ``"starttls"`` (the default; the relay must offer STARTTLS),
            ``"implicit"`` (TLS from the first byte, RFC 8314) or ``"none"``;
            ``True`` and ``False`` mean ``"starttls"`` and ``"none"``.
        ca_file: a PEM bundle of CAs to trust instead of the system's.
        verify_certificates: ``False`` turns certificate and host name
            checks off (the only way to do so; logged as a warning).
        ssl_context: a ready ``ssl.SSLContext`` to use instead of the one
            built from ``ca_file``; one that does not check certificates
            and host names needs ``verify_certificates=False`` as well.
        allow_plaintext_auth: allow AUTH over a connection without TLS
            (exposes the password to anyone on the path).
        connect_timeout: seconds for the TCP connection, the implicit TLS
            handshake and the relay's greeting (which waits at most
            ``timeout`` too).
        timeout: seconds for each command's reply (EHLO, STARTTLS, AUTH,
            MAIL, RCPT, DATA, RSET, QUIT) and for each block of message data.
        data_timeout: seconds to wait for the reply after the final dot
            (RFC 5321 asks for 10 minutes: a shorter wait causes duplicates).
        local_hostname: the name sent with EHLO; default this host's FQDN.
        reuse_connections: keep each thread's connection open for its next
            message (default); ``False`` closes it after every ``send``.
        pipelining: send ``MAIL``, ``RCPT`` and ``DATA`` in one write when
            the relay offers PIPELINING (RFC 2920; default); ``False`` waits
            for each reply, for a relay that offers it but gets it wrong.
        hostname: zope.sendmail's and repoze.sendmail's name for ``host``.
        no_tls: their flag for no TLS at all. This flag and the next three
            choose the TLS mode as :func:`mailspool.smtp.compat.tls_mode`
            explains (no flag: verified STARTTLS is required, where the
            older packages fell back to clear text).
        force_tls: their flag for STARTTLS, required.
        implicit_tls: their flag for TLS from the first byte.
        ssl: pyramid_mailer's name for ``implicit_tls``.
        keyfile: a client certificate's key (PEM), as pyramid_mailer's;
            only with TLS and without ``ssl_context``.
        certfile: the client certificate (PEM) to present to the relay.
        debug_smtp: repoze.sendmail's; ``True`` is accepted but only logs a
            warning, because smtplib's debug output would show the AUTH
            exchange: mailspool logs each step at DEBUG level instead.

    Raises:
        ValueError: for an unknown or contradictory ``tls`` mode, ``host``
            and ``hostname`` that differ, a password without a user
            name (or the reverse), a non-ASCII user name or password (smtplib's
            AUTH is ASCII only), AUTH without TLS when
            ``allow_plaintext_auth`` is not set, an unreadable ``ca_file``,
            ``ca_file`` together with ``ssl_context``, or an ``ssl_context``
            whose checks disagree with ``verify_certificates``.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        *,
        tls: TLSMode | bool | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify_certificates: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        allow_plaintext_auth: bool = False,
        connect_timeout: float = 60.0,
        timeout: float = 300.0,
        data_timeout: float = 600.0,
        local_hostname: str | None = None,
        reuse_connections: bool = True,
        pipelining: bool = True,
        hostname: str | None = None,
        no_tls: bool = False,
        force_tls: bool = False,
        implicit_tls: bool = False,
        ssl: bool = False,
        keyfile: str | os.PathLike[str] | None = None,
        certfile: str | os.PathLike[str] | None = None,
        debug_smtp: bool | int = False,
    ) -> None:
        host = _relay_host(host, hostname)
        tls = tls_mode(tls, no_tls=no_tls, force_tls=force_tls, implicit_tls=implicit_tls, ssl=ssl)
        self._client_cert = _client_cert(certfile, keyfile, tls, ssl_context)
        if debug_smtp:
            _ignore_debug_smtp()
        _check_auth(username, password, tls, allow_plaintext_auth=allow_plaintext_auth)
        _check_timeouts(connect_timeout=connect_timeout, timeout=timeout, data_timeout=data_timeout)
        if ssl_context is not None:
            _check_context(ssl_context, ca_file, verify_certificates)
        self.host = host
        self.port = port if port is not None else (465 if tls == "implicit" else 25)
        self.username = username
        self._credentials = (
            Credentials(username, password)
            if username is not None and password is not None
            else None
        )
        self.tls: TLSMode = tls
        self.ca_file = os.fspath(ca_file) if ca_file is not None else None
        self.verify_certificates = verify_certificates
        self.allow_plaintext_auth = allow_plaintext_auth
        self.connect_timeout = float(connect_timeout)
        self.timeout = float(timeout)
        self.data_timeout = float(data_timeout)
        self.local_hostname = local_hostname
        self.reuse_connections = reuse_connections
        self.pipelining = pipelining
        self.ssl_context = ssl_context if ssl_context is not None else self._make_context()
        self._warn_about_tls()
        self._local = _ThreadConnection()

    def _warn_about_tls(self) -> None:
        if self.tls != "none" and not self.verify_certificates:
            log.warning(
                "TLS certificate verification is OFF for %s:%d (verify_certificates=False)",
                self.host,
                self.port,
            )
        if self.tls == "starttls" and self.port == 465:
            log.warning(
                "port 465 is usually SMTPS (implicit TLS), but tls='starttls' waits for "
                "a plain greeting there: did you mean tls='implicit'?"
            )

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
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self._client_cert is not None:
            certfile, keyfile = self._client_cert
            try:
                context.load_cert_chain(certfile, keyfile)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the client certificate {certfile!r}: {exc}") from exc
        return context

    def __repr__(self) -> str:
        auth = "" if self.username is None else f", username={self.username!r}, password=<hidden>"
        return f"SMTPMailer(host={self.host!r}, port={self.port}, tls={self.tls!r}{auth})"

    # -- connections --------------------------------------------------------

    def connect(self) -> SMTPConnection:
        """Open a new connection: greeting read, EHLO sent, TLS up, AUTH done.

        The connection is the caller's (use it as a context manager); it is
        not the thread's connection that :meth:`send` reuses.

        Returns:
            The :class:`SMTPConnection`.

        Raises:
            RelayUnavailable: cannot connect, no or a 4xx/5xx greeting, 421.
            TLSFailure: STARTTLS not offered or refused, certificate not
                trusted or not for this host, handshake failed.
            AuthenticationError: AUTH not offered, no common mechanism,
                credentials refused (535), AUTH required (530).
        """
        return SMTPConnection(self, self._credentials)

    def _thread_connection(self) -> tuple[SMTPConnection, bool]:
        """This thread's connection, alive, and whether it was opened just now."""
        conn = self._local.conn
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
        if self._local.conn is conn:
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

        Args:
            fromaddr: the envelope sender (a display name is allowed).
            toaddrs: the recipients, or one recipient as a string.
            message: the message.

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

        ``data`` is what :func:`mailspool.message.to_wire` produced (CRLF
        line endings; other line endings are normalised anyway).
        """
        conn, _ = self._thread_connection()
        try:
            return conn.send(envelope, data, retry_stale=True)
        finally:
            self._release(conn)

    def vote(self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput) -> None:
        """Check, before a transaction commits, that the message can be sent.

        Validates the input, opens (or checks with NOOP) this thread's
        connection, and checks the message against what the relay offers
        (SMTPUTF8, 8BITMIME, SIZE).  The connection is kept for the next
        :meth:`send` in this thread; :meth:`abort` drops it.

        Raises:
            RelayUnavailable: as :meth:`connect` raises it.
            TLSFailure: as :meth:`connect` raises it.
            AuthenticationError: as :meth:`connect` raises it.
            SMTPUTF8Required: an address is not ASCII and the relay does not
                offer SMTPUTF8.
            MessageTooLarge: the message is over the relay's SIZE.
            PermanentError: 8-bit data and the relay offers no 8BITMIME.
            InvalidAddress: a bad sender or recipient, or no recipients.
            InvalidMessage: the message cannot be sent as it is.
        """
        envelope = make_envelope(fromaddr, toaddrs)
        data = to_wire(message)
        conn, fresh = self._thread_connection()
        if not fresh and not conn.noop():
            conn, _ = self._thread_connection()
        conn.check(envelope, data)

    def abort(self) -> None:
        """Close and forget the connection :meth:`vote` opened in this thread."""
        conn = self._local.conn
        self._local.conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close this thread's connection (another thread's is left alone)."""
        self.abort()
