"""What an application's own tests use instead of a relay.

:class:`InMemoryMailer` is a drop-in ``IMailer``: it validates its input
exactly as :class:`~mailspool.SMTPMailer` does (the same
:mod:`mailspool.message` functions), then records each message in an
:class:`Outbox` instead of sending it.  It can be told to fail on demand --
an error at the next ``send`` or ``vote``, a refused recipient -- so that
the error paths of an application (and of mailspool's own deliveries and
processor) can be tested without a network.  It also offers ``connect()``
and ``send_envelope()``, the fast paths of the real mailer.

Example::

    mailer = InMemoryMailer()
    delivery = DirectMailDelivery(mailer)
    ...
    transaction.commit()
    assert mailer.outbox[0].recipients == ("jane@example.org",)
    assert mailer.outbox[0].message["Subject"] == "Welcome"
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import EmailMessage
from types import MappingProxyType, TracebackType
from typing import Literal

from zope.interface import implementer

from mailspool.errors import TransientError
from mailspool.interfaces import IMailer
from mailspool.message import Envelope, make_envelope, to_wire
from mailspool.smtp.result import MessageInput, Reply, SendResult, all_refused

__all__ = ["InMemoryConnection", "InMemoryMailer", "Outbox", "SentMessage", "queued_messages"]

_HEADERS_ONLY = email.parser.BytesHeaderParser(policy=email.policy.default)
_PARSER = email.parser.BytesParser(policy=email.policy.default)


def _message_id(data: bytes) -> str | None:
    value = _HEADERS_ONLY.parsebytes(data).get("Message-Id")
    if value is None:
        return None
    return str(value).strip().strip("<>") or None


@dataclass(frozen=True)
class SentMessage:
    """One message the in-memory mailer accepted.

    Attributes:
        envelope: the envelope, with the recipients that were accepted.
        data: the message as it would have gone on the wire (CRLF endings).
        message_id: the Message-Id without angle brackets, or ``None``.
    """

    envelope: Envelope
    data: bytes
    message_id: str | None

    @property
    def sender(self) -> str:
        """The envelope sender."""
        return self.envelope.sender

    @property
    def recipients(self) -> tuple[str, ...]:
        """The envelope recipients that were accepted."""
        return self.envelope.recipients

    @property
    def message(self) -> EmailMessage:
        """The message parsed (``email.policy.default``), for assertions on headers and body.

        Line endings are ``\\n`` in it, as the ``email`` package uses them.
        """
        return _PARSER.parsebytes(self.data.replace(b"\r\n", b"\n"))


class Outbox(list[SentMessage]):
    """The messages an :class:`InMemoryMailer` accepted, oldest first."""

    def to(self, address: str) -> list[SentMessage]:
        """The messages sent to ``address`` (an exact envelope recipient)."""
        return [sent for sent in self if address in sent.recipients]


_Phase = Literal["send", "vote"]


@implementer(IMailer)
class InMemoryMailer:
    """An ``IMailer`` that records messages instead of sending them.

    Args:
        outbox: where to record; a new :class:`Outbox` by default.

    Attributes:
        outbox: the :class:`Outbox` of accepted messages.
        votes: how many times :meth:`vote` was called.
        aborts: how many times :meth:`abort` was called.
    """

    def __init__(self, outbox: Outbox | None = None) -> None:
        self.outbox = outbox if outbox is not None else Outbox()
        self.votes = 0
        self.aborts = 0
        self._lock = threading.Lock()
        self._failures: dict[_Phase, list[BaseException]] = {"send": [], "vote": []}
        self._refusals: dict[str, Reply] = {}

    def __repr__(self) -> str:
        return f"<InMemoryMailer outbox={len(self.outbox)}>"

    # -- failing on demand ---------------------------------------------------

    def fail_next(
        self, error: BaseException | None = None, *, times: int = 1, on: _Phase = "send"
    ) -> None:
        """Make the next ``times`` calls of ``send`` (or ``vote``) raise ``error``.

        Args:
            error: the exception to raise; by default a ``TransientError``
                like a relay's 451.
            times: how many calls fail (each raises the same instance).
            on: ``"send"`` (also ``send_envelope`` and connections) or ``"vote"``.
        """
        if on not in ("send", "vote"):
            raise ValueError(f"on must be 'send' or 'vote'; got {on!r}")
        if error is None:
            error = TransientError("4.3.0 simulated temporary failure", code=451)
        with self._lock:
            self._failures[on].extend([error] * times)

    def refuse(
        self, address: str, code: int = 550, text: str = "5.1.1 mailbox unavailable"
    ) -> None:
        """Refuse ``address`` at every later send, with this reply.

        The other recipients are accepted and the refusal is reported in
        the :class:`~mailspool.result.SendResult`, as a relay would (a 552
        is recorded as 452, as :class:`~mailspool.SMTPMailer` records a 552
        at ``RCPT``); when every recipient is refused, the mailer raises
        what ``SMTPMailer`` would: ``RecipientsRefused``, or the error about
        the relay for a code such as 530.
        """
        with self._lock:
            self._refusals[address] = Reply(452 if code == 552 else code, text)

    def reset(self) -> None:
        """Forget the recorded messages, the pending failures and refusals, the counters."""
        with self._lock:
            self.outbox.clear()
            self._failures = {"send": [], "vote": []}
            self._refusals.clear()
            self.votes = self.aborts = 0

    def _maybe_fail(self, phase: _Phase) -> None:
        with self._lock:
            pending = self._failures[phase]
            error = pending.pop(0) if pending else None
        if error is not None:
            raise error

    # -- IMailer ---------------------------------------------------------------

    def send(
        self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput
    ) -> SendResult:
        """Validate and record the message; return what a relay would have said.

        Raises:
            InvalidAddress, InvalidMessage: bad input, as the real mailers.
            RecipientsRefused: every recipient was refused (see :meth:`refuse`).
            whatever :meth:`fail_next` asked for.
        """
        return self.send_envelope(make_envelope(fromaddr, toaddrs), to_wire(message))

    def send_envelope(self, envelope: Envelope, data: bytes) -> SendResult:
        """Like :meth:`send` for an already validated envelope and wire bytes."""
        data = to_wire(data)
        self._maybe_fail("send")
        with self._lock:
            refused = {r: self._refusals[r] for r in envelope.recipients if r in self._refusals}
        accepted = tuple(r for r in envelope.recipients if r not in refused)
        if not accepted:
            raise all_refused(envelope.recipients, refused)
        sent = SentMessage(Envelope(envelope.sender, accepted), data, _message_id(data))
        with self._lock:
            self.outbox.append(sent)
        return SendResult(accepted, MappingProxyType(refused), Reply(250, "2.0.0 OK (in memory)"))

    def vote(self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput) -> None:
        """Validate the input, count the vote, and fail if :meth:`fail_next` asked for it."""
        make_envelope(fromaddr, toaddrs)
        to_wire(message)
        with self._lock:
            self.votes += 1
        self._maybe_fail("vote")

    def abort(self) -> None:
        """Count the abort (there is nothing to close)."""
        with self._lock:
            self.aborts += 1

    def connect(self) -> InMemoryConnection:
        """A connection-shaped handle, like :meth:`mailspool.SMTPMailer.connect`."""
        return InMemoryConnection(self)


class InMemoryConnection:
    """What :meth:`InMemoryMailer.connect` returns: ``send(envelope, data)``, ``close()``."""

    def __init__(self, mailer: InMemoryMailer) -> None:
        self._mailer: InMemoryMailer | None = mailer
        self.transactions = 0

    @property
    def alive(self) -> bool:
        """True until :meth:`close`."""
        return self._mailer is not None

    def send(self, envelope: Envelope, data: bytes, *, retry_stale: bool = True) -> SendResult:
        """Record one message through the mailer (see :meth:`InMemoryMailer.send_envelope`).

        ``retry_stale`` is accepted for :class:`~mailspool.mailer.SMTPConnection`'s
        signature; an in-memory connection never goes stale.
        """
        if self._mailer is None:
            raise ValueError("the connection is closed")
        result = self._mailer.send_envelope(envelope, data)
        self.transactions += 1
        return result

    def close(self) -> None:
        """Close the connection; :attr:`alive` becomes False."""
        self._mailer = None

    def __enter__(self) -> InMemoryConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def queued_messages(spool_path: str | os.PathLike[str]) -> Outbox:
    """The messages a spool holds for sending, oldest first, for tests to assert on.

    What a :class:`~mailspool.QueuedMailDelivery` (or a framework's email
    backend) committed into a spool in a temporary directory: ready,
    deferred, held or being sent; not the failed or quarantined ones.  The
    spool is only read.

    Example::

        assert queued_messages(tmp_path / "spool")[0].message["Subject"] == "Welcome"

    Raises:
        SpoolError: ``spool_path`` is not a spool.
    """
    from mailspool import Spool

    spool = Spool(spool_path, create=False)
    waiting = ("ready", "deferred", "held", "in_flight")
    entries = sorted(
        (e for e in spool.entries() if e.state in waiting),
        key=lambda e: (e.queued_at or 0.0, e.id),
    )
    out = Outbox()
    for e in entries:
        envelope = Envelope(e.sender, tuple(r.address for r in e.recipients))
        out.append(SentMessage(envelope, spool.message(e.id), e.message_id))
    return out
