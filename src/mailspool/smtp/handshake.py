"""Opening an SMTP session: TCP, greeting, EHLO, STARTTLS, AUTH -- securely or not at all.

Everything that happens before the first message lives here, apart from the
transactions (:mod:`mailspool.smtp.session`), because this is where the
security promises are kept and where a failure means "the relay or our
configuration", never "this message":

* TLS is required unless ``tls="none"`` was chosen: with ``starttls`` a relay
  that does not offer STARTTLS (or a man in the middle who removed it from
  the EHLO reply) is refused before anything else is sent; certificates
  and host names are checked with the context the mailer built
  (``ssl.create_default_context()``), never smtplib's unverified default.
* AUTH is sent only over TLS (unless the mailer allows plain text), with one
  mechanism and one attempt, and the password is held by
  :class:`Credentials`, whose repr hides it; it is wiped from smtplib's
  object as soon as AUTH is done.
* Network-level failures are turned into classified errors
  (:func:`network_error`): ``RelayUnavailable`` or ``TLSFailure`` or
  ``AuthenticationError`` here (``about_relay``), ``ConnectionFailed`` or
  ``SMTPTimeout`` during a transaction.
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from mailspool.errors import (
    AuthenticationError,
    ConnectionFailed,
    DeliveryError,
    RelayUnavailable,
    SMTPTimeout,
    TLSFailure,
    error_for_reply,
    reply_text,
)
from mailspool.smtp.seams import SessionSettings

__all__ = [
    "AUTH_MECHANISMS",
    "Credentials",
    "certificate_error",
    "certificate_names",
    "default_local_hostname",
    "network_error",
    "open_session",
]

#: AUTH mechanisms in order of preference.  Under TLS, PLAIN is the standard;
#: CRAM-MD5 (historic, RFC 8314 era) only when nothing else is offered.
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


class Credentials:
    """A user name and password for AUTH; the password never shows.

    Args:
        username: the user name (ASCII).
        password: the password (ASCII).
    """

    __slots__ = ("_password", "username")

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password

    def reveal(self) -> str:
        """The password, for the AUTH exchange only."""
        return self._password

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"


@lru_cache(maxsize=1)
def default_local_hostname() -> str:
    """The name to send with EHLO: this host's FQDN, or its address literal."""
    # What smtplib would send, computed once instead of at every connection.
    fqdn = socket.getfqdn()
    if "." in fqdn:
        return fqdn
    try:
        return f"[{socket.gethostbyname(socket.gethostname())}]"
    except OSError:
        return "[127.0.0.1]"


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH:
#: the chain was trusted, only the name we connected to is not in it.
_NAME_MISMATCH = (62, 64)


def certificate_error(
    exc: ssl.SSLCertVerificationError,
    where: str,
    *,
    host: str = "",
    names: Callable[[], list[str]] | None = None,
) -> TLSFailure:
    """The error for a relay certificate that was not accepted, with what to do about it.

    Args:
        exc: the verification failure.
        where: ``host:port`` of the relay, for the text.
        host: the name or address we connected to.
        names: for a certificate made out to another name, a function that
            finds the names it is for (see :func:`certificate_names`); the
            text then says which host to use instead of suggesting a CA.
    """
    reason = exc.verify_message or str(exc)
    if exc.verify_code not in _NAME_MISMATCH:
        return TLSFailure(
            f"certificate of {where} was not accepted: {reason}; trust its CA "
            "with ca_file=..., or turn checks off with verify_certificates=False"
        )
    found = names() if names is not None else []
    if not found:
        return TLSFailure(
            f"certificate of {where} is not for {host or 'the host connected to'} "
            f"({reason}); connect with the host name the certificate is for "
            "(--host NAME, or host=NAME)"
        )
    usable = [n for n in found if not n.startswith("*.")] or found
    return TLSFailure(
        f"certificate of {where} is for {', '.join(found)}, not {host}: "
        f"use --host {usable[0]} (host={usable[0]!r}); the certificate itself "
        "is trusted, so ca_file is not what is missing"
    )


def certificate_names(settings: SessionSettings) -> list[str]:
    """The names in the relay's certificate, read by a second, name-blind handshake.

    Called only after a host name mismatch, to say which host to use: the
    certificate is checked against the same CAs as before, only its names
    are not compared with the host.  Nothing but EHLO and STARTTLS is sent.

    Returns:
        The DNS names and addresses of the certificate (subjectAltName, else
        its common name); empty when they could not be read.
    """
    context = ssl.create_default_context()
    trusted = settings.ssl_context
    with contextlib.suppress(ssl.SSLError, ValueError):
        for der in trusted.get_ca_certs(binary_form=True) if trusted is not None else ():
            context.load_verify_locations(cadata=der)
    context.check_hostname = False
    local = settings.local_hostname or default_local_hostname()
    timeout = settings.connect_timeout
    try:
        if settings.tls == "implicit":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                settings.host, settings.port, local_hostname=local, timeout=timeout, context=context
            )
        else:
            smtp = smtplib.SMTP(settings.host, settings.port, local_hostname=local, timeout=timeout)
        try:
            if settings.tls != "implicit":
                smtp.ehlo()
                smtp.starttls(context=context)
            sock = smtp.sock
            cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
        finally:
            smtp.close()
    except (smtplib.SMTPException, OSError):
        return []
    if not cert:
        return []
    pairs: Any = cert.get("subjectAltName", ())
    alt = [str(value) for kind, value in pairs if kind in _ALT_KINDS]
    if alt:
        return alt
    subject: Any = cert.get("subject", ())
    return [str(v) for rdn in subject for k, v in rdn if k == "commonName"]


_ALT_KINDS = ("DNS", "IP Address")


def network_error(
    exc: OSError,
    where: str,
    phase: str,
    *,
    limit: float,
    relay: bool = False,
    maybe_sent: bool = False,
) -> DeliveryError:
    """Turn a network-level failure into a classified error (the caller closes the socket).

    Args:
        exc: what smtplib or the socket raised.
        where: ``host:port`` of the relay, for the text.
        phase: what was going on (``"EHLO"``, ``"RCPT TO"``...), for the text.
        limit: the timeout that applied, in seconds, for the text.
        relay: the failure happened while opening the session, so it is about
            the relay: ``RelayUnavailable`` rather than ``ConnectionFailed``
            or ``SMTPTimeout``.
        maybe_sent: the final dot was sent: the text says the message may
            have been delivered.

    Returns:
        The error (not raised).
    """
    timed_out = isinstance(exc, TimeoutError) or (
        isinstance(exc, smtplib.SMTPServerDisconnected)
        and isinstance(exc.__context__, TimeoutError)
    )
    note = "; the message may have been delivered" if maybe_sent else ""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return certificate_error(exc, where)
    if timed_out:
        text = f"{where} did not answer {phase} within {limit:g} s{note}"
        timeout = RelayUnavailable(text) if relay else SMTPTimeout(text)
        timeout.maybe_sent = maybe_sent
        return timeout
    if isinstance(exc, smtplib.SMTPResponseException):
        text = f"{where} sent a malformed reply to {phase}: {reply_text(exc.smtp_error)}{note}"
    elif isinstance(exc, smtplib.SMTPServerDisconnected):
        text = f"{where} closed the connection during {phase}{note}"
    else:
        text = f"connection to {where} failed during {phase}: {exc}{note}"
    error = RelayUnavailable(text) if relay else ConnectionFailed(text)
    error.maybe_sent = maybe_sent
    return error


def open_session(settings: SessionSettings, credentials: Credentials | None) -> smtplib.SMTP:
    """Connect to the mailer's relay: greeting read, EHLO sent, TLS up, AUTH done.

    Args:
        settings: the relay and how to talk to it (host, port, TLS mode and
            context, timeouts...): an ``SMTPMailer``, or any
            :class:`~mailspool.smtp.seams.SessionSettings`.
        credentials: for AUTH, or ``None``.

    Returns:
        The ready ``smtplib.SMTP``, its socket timeout set to ``settings.timeout``.

    Raises:
        RelayUnavailable: cannot connect, no or a 4xx/5xx greeting, EHLO
            refused, 421, the connection lost or stalled while opening.
        TLSFailure: STARTTLS not offered or refused, certificate not
            trusted or not for this host, handshake failed.
        AuthenticationError: AUTH not offered, no common mechanism,
            credentials refused.
    """
    smtp = _connect(settings)
    try:
        _setup(settings, smtp, credentials)
    except BaseException:
        smtp.close()
        raise
    return smtp


def _where(settings: SessionSettings) -> str:
    return f"{settings.host}:{settings.port}"


def _certificate_error(settings: SessionSettings, exc: ssl.SSLCertVerificationError) -> TLSFailure:
    return certificate_error(
        exc, _where(settings), host=settings.host, names=lambda: certificate_names(settings)
    )


def _port_hint(settings: SessionSettings) -> str:
    """What to try when the TLS mode looks wrong for the port."""
    if settings.tls != "implicit" and settings.port == 465:
        return "; port 465 is usually SMTPS: try tls='implicit'"
    if settings.tls == "implicit" and settings.port in (25, 587):
        return f"; port {settings.port} usually expects tls='starttls'"
    return ""


def _first_line(sock: socket.socket, wait: float) -> bytes:
    """The relay's first line, peeked at (left for smtplib to read), within ``wait`` s."""
    sock.settimeout(wait)
    if isinstance(sock, ssl.SSLSocket):
        return b""  # no peeking through TLS; a server that is not SMTP fails its handshake
    try:
        data = sock.recv(512, socket.MSG_PEEK)
    except TimeoutError as exc:
        sock.close()
        raise smtplib.SMTPServerDisconnected("no greeting") from exc
    return data.splitlines()[0] if data else b""


class _GreetingFirst:
    """Connects within the connect timeout, then waits ``greeting_timeout`` for
    the greeting; mixed into smtplib's two client classes below."""

    greeting_timeout = 300.0
    banner = b""
    _host: str

    def _get_socket(self, host: str, port: int, timeout: float | None) -> socket.socket:
        # smtplib's hook for making the socket (not in its type stubs).
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        self.banner = _first_line(sock, self.greeting_timeout)
        return sock


class _SMTP(_GreetingFirst, smtplib.SMTP):
    """Plain SMTP, STARTTLS later if asked: see :class:`_GreetingFirst`."""


class _SMTP_SSL(_GreetingFirst, smtplib.SMTP_SSL):
    """:class:`_SMTP` for implicit TLS: the handshake within the connect timeout."""


def _greeting_wait(m: SessionSettings) -> float:
    """How long the greeting may take: it is part of connecting, and a reply."""
    return min(m.connect_timeout, m.timeout)


def _open(m: SessionSettings, local: str) -> smtplib.SMTP:
    """Connected and greeted: ``connect_timeout`` for TCP (and implicit TLS),
    the shorter of it and ``timeout`` for the greeting."""
    smtp: _SMTP | _SMTP_SSL
    if m.tls == "implicit":
        smtp = _SMTP_SSL(local_hostname=local, timeout=m.connect_timeout, context=m.ssl_context)
    else:
        smtp = _SMTP(local_hostname=local, timeout=m.connect_timeout)
    smtp.greeting_timeout = _greeting_wait(m)
    smtp._host = m.host  # what the constructor sets: STARTTLS checks the certificate for it
    code, text = smtp.connect(m.host, m.port)
    if code == -1:  # the first line is not an SMTP reply: another protocol
        smtp.close()
        banner = smtp.banner.decode("ascii", "backslashreplace")[:100] or text.decode()
        raise RelayUnavailable(
            f"{_where(m)} did not speak SMTP: it greeted with {banner!r}, not a 220 "
            f"reply; is {m.port} the relay's SMTP port?{_port_hint(m)}"
        )
    if code != 220:
        smtp.close()
        raise smtplib.SMTPConnectError(code, text)
    return smtp


def _connect(settings: SessionSettings) -> smtplib.SMTP:
    m = settings
    where = _where(m)
    local = m.local_hostname or default_local_hostname()
    try:
        smtp = _open(m, local)
    except smtplib.SMTPConnectError as exc:
        raise error_for_reply(
            exc.smtp_code,
            f"{reply_text(exc.smtp_error)} [greeting of {where}]",
            phase="greeting",
        ) from exc
    except smtplib.SMTPServerDisconnected as exc:
        if isinstance(exc.__context__, TimeoutError):
            text = f"no greeting from {where} within {_greeting_wait(m):g} s{_port_hint(m)}"
        else:
            text = f"{where} closed the connection before its greeting{_port_hint(m)}"
        raise RelayUnavailable(text) from exc
    except ssl.SSLCertVerificationError as exc:
        raise _certificate_error(m, exc) from exc
    except ssl.SSLError as exc:
        raise TLSFailure(f"TLS handshake with {where} failed: {exc}{_port_hint(m)}") from exc
    except TimeoutError as exc:
        raise RelayUnavailable(
            f"connecting to {where} timed out after {m.connect_timeout:g} s{_port_hint(m)}"
        ) from exc
    except OSError as exc:
        raise RelayUnavailable(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    sock = smtp.sock
    if sock is None:  # pragma: no cover - smtplib always sets it on success
        raise ConnectionFailed(f"no socket after connecting to {where}")
    sock.settimeout(m.timeout)
    # MAIL/RCPT/DATA each wait for their reply, so Nagle's algorithm would
    # only ever delay the last block of a message.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return smtp


def _setup(settings: SessionSettings, smtp: smtplib.SMTP, credentials: Credentials | None) -> None:
    where = _where(settings)
    needs_esmtp = settings.tls == "starttls" or credentials is not None
    _hello(settings, smtp, allow_helo=not needs_esmtp)
    if settings.tls == "starttls":
        if not smtp.has_extn("starttls"):
            raise TLSFailure(
                f"{where} does not offer STARTTLS, and TLS is required "
                "(tls='starttls'); nothing was sent.  Use tls='implicit' for "
                "an SMTPS port, or tls='none' only for a trusted local relay"
            )
        try:
            smtp.starttls(context=settings.ssl_context)
        except smtplib.SMTPResponseException as exc:
            text = f"{reply_text(exc.smtp_error)} [STARTTLS to {where}]"
            if exc.smtp_code == 421:
                raise error_for_reply(421, text, phase="starttls") from exc
            # Any other refusal (454 "TLS not available", 5xx) is a TLS
            # failure, whatever the code would mean after AUTH.
            raise TLSFailure(text, code=exc.smtp_code) from exc
        except ssl.SSLCertVerificationError as exc:
            raise _certificate_error(settings, exc) from exc
        except ssl.SSLError as exc:
            raise TLSFailure(f"TLS handshake with {where} failed: {exc}") from exc
        except OSError as exc:
            raise _opening_error(settings, exc, "STARTTLS") from exc
        _hello(settings, smtp, allow_helo=False)
    if credentials is not None:
        _login(settings, smtp, credentials)


def _opening_error(settings: SessionSettings, exc: OSError, phase: str) -> DeliveryError:
    return network_error(exc, _where(settings), phase, limit=settings.timeout, relay=True)


def _hello(settings: SessionSettings, smtp: smtplib.SMTP, *, allow_helo: bool) -> None:
    try:
        code, reply = smtp.ehlo()
        if not 200 <= code < 300 and allow_helo and code != 421:
            code, reply = smtp.helo()
    except OSError as exc:
        raise _opening_error(settings, exc, "EHLO") from exc
    if not 200 <= code < 300:
        text = f"{reply_text(reply)} [EHLO to {_where(settings)}]"
        raise error_for_reply(code, text, phase="ehlo")


def _login(settings: SessionSettings, smtp: smtplib.SMTP, credentials: Credentials) -> None:
    where = _where(settings)
    encrypted = isinstance(smtp.sock, ssl.SSLSocket)
    if not encrypted and not settings.allow_plaintext_auth:
        # Unreachable through SMTPMailer's checks; kept as the last guard.
        raise TLSFailure(f"refusing to send AUTH to {where} without TLS")
    if not smtp.has_extn("auth"):
        raise AuthenticationError(
            f"{where} does not offer AUTH"
            + ("" if encrypted else " (over a connection without TLS)")
        )
    offered = smtp.esmtp_features.get("auth", "").upper().split()
    mechanism = next((m for m in AUTH_MECHANISMS if m in offered), None)
    if mechanism is None:
        raise AuthenticationError(
            f"no AUTH mechanism in common with {where}: it offers "
            f"{' '.join(offered) or 'none'}; mailspool supports {', '.join(AUTH_MECHANISMS)}"
        )
    # One mechanism, one attempt: smtplib's login() would try the next
    # mechanism after a refusal, sending a wrong password again (and
    # counting twice towards the account's lockout).
    smtp.user, smtp.password = credentials.username, credentials.reveal()
    answers: dict[str, Callable[..., str]] = {
        "PLAIN": smtp.auth_plain,
        "LOGIN": smtp.auth_login,
        "CRAM-MD5": smtp.auth_cram_md5,
    }
    answer = answers[mechanism]
    try:
        smtp.auth(mechanism, answer)
    except smtplib.SMTPResponseException as exc:
        raise error_for_reply(exc.smtp_code, reply_text(exc.smtp_error), phase="auth") from None
    except smtplib.SMTPServerDisconnected as exc:
        raise _opening_error(settings, exc, "AUTH") from None
    except smtplib.SMTPException as exc:  # e.g. endless challenges
        raise AuthenticationError(f"AUTH {mechanism} with {where} failed: {exc}") from None
    except OSError as exc:
        raise _opening_error(settings, exc, "AUTH") from None
    finally:
        # smtplib keeps the credentials on the object; do not.
        smtp.user = smtp.password = ""
