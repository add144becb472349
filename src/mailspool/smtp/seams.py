"""What the deliveries and the processor need of a mailer and of a connection (typed seams).

A mailer is anything with zope.sendmail's ``send(fromaddr, toaddrs,
message)`` (:class:`Mailer`).  The rest is optional, one capability per
Protocol, so that a caller asks ``isinstance(mailer, Voting)`` once instead
of probing attributes:

=======================  ====================================================
:class:`EnvelopeMailer`  ``send_envelope(envelope, data)``: the fast path for
                         a message already validated and normalised
:class:`ConnectingMailer`  ``connect()``: a :class:`Connection` that carries
                         many messages (what the processor's pool holds)
:class:`VotingMailer`    ``vote(...)``: checked before the commit
:class:`AbortingMailer`  ``abort()``: drop what ``vote`` prepared
:class:`RelayAddress`    ``host`` and ``port``: where the relay is, for logs
=======================  ====================================================

And the other way round, :class:`SessionSettings` is what the session code
needs of the mailer that opens a session: its settings, not the mailer.

:class:`~mailspool.smtp.mailer.SMTPMailer` has all of them,
:class:`~mailspool.smtp.sendmail.SendmailMailer` and
:class:`~mailspool.testing.InMemoryMailer` most.  The Protocols are
``runtime_checkable``: ``isinstance`` looks only at the names, the types are
mypy's to check.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from mailspool.message import Envelope
from mailspool.smtp.compat import TLSMode
from mailspool.smtp.result import SendResult

__all__ = [
    "AbortingMailer",
    "ConnectingMailer",
    "Connection",
    "EnvelopeMailer",
    "Mailer",
    "RelayAddress",
    "SessionSettings",
    "TimedConnection",
    "VotingMailer",
]


@runtime_checkable
class Mailer(Protocol):
    """Sends one message now (zope.sendmail's ``IMailer.send``).

    What it returns is a :class:`~mailspool.smtp.result.SendResult` for
    mailspool's mailers; others may return anything (``None``: every
    recipient taken).  Raises a ``DeliveryError`` when nothing was accepted.
    """

    def send(self, fromaddr: str, toaddrs: Sequence[str], message: bytes, /) -> object: ...


@runtime_checkable
class EnvelopeMailer(Protocol):
    """Sends a message whose envelope is made and whose data is on-the-wire bytes."""

    def send_envelope(self, envelope: Envelope, data: bytes, /) -> SendResult: ...


@runtime_checkable
class Connection(Protocol):
    """One session with a relay that carries many messages (``SMTPConnection`` is one)."""

    @property
    def alive(self) -> bool:
        """Whether it may still carry a message (the relay has not closed it)."""

    def send(self, envelope: Envelope, data: bytes, /) -> SendResult: ...

    def close(self) -> None: ...


@runtime_checkable
class TimedConnection(Protocol):
    """A connection that counts the seconds it waited for the relay's replies."""

    @property
    def waited(self) -> float: ...


@runtime_checkable
class ConnectingMailer(Protocol):
    """A mailer whose connections can be held and reused."""

    def connect(self) -> Connection: ...


@runtime_checkable
class VotingMailer(Protocol):
    """A mailer that checks, before a transaction commits, that sending can succeed."""

    def vote(self, fromaddr: str, toaddrs: Sequence[str], message: bytes, /) -> None: ...


@runtime_checkable
class AbortingMailer(Protocol):
    """A mailer that drops what its ``vote`` prepared when the transaction aborts."""

    def abort(self) -> None: ...


@runtime_checkable
class RelayAddress(Protocol):
    """Where a mailer's relay is."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class SessionSettings(Protocol):
    """What opening and carrying a session needs to know: the relay and how to talk to it.

    :class:`~mailspool.smtp.mailer.SMTPMailer` has these; the session code
    (:mod:`~mailspool.smtp.handshake`, :mod:`~mailspool.smtp.session`) takes
    this, not the mailer, so that it never imports the mailer.
    """

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls(self) -> TLSMode: ...
    @property
    def ssl_context(self) -> ssl.SSLContext | None: ...
    @property
    def allow_plaintext_auth(self) -> bool: ...
    @property
    def local_hostname(self) -> str | None: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def data_timeout(self) -> float: ...
    @property
    def pipelining(self) -> bool: ...
