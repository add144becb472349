"""The SMTP client protocol, sans I/O: bytes in, replies and steps out.

Nothing here touches a socket.  :class:`ReplyReader` turns the bytes a
relay sent into :class:`~mailspool.smtp.result.Reply` objects (multi-line
replies joined, a garbled line refused); :class:`Transaction` is one
message's transaction (``MAIL``, one ``RCPT`` per recipient, ``DATA``, the
message, the final dot) as a state machine: it says what to write, and
each reply fed to it moves it on and says what to do next.  The transport
(:mod:`mailspool.smtp.session`) does the reading and the writing, with the
timeout the current :attr:`Transaction.phase` calls for.

The rules it keeps, in one place:

* every recipient's reply is kept; a 552 to ``RCPT`` counts as 452
  (RFC 5321 4.5.3.1.10: too many recipients, try later);
* with PIPELINING (RFC 2920) ``MAIL``, every ``RCPT`` and ``DATA`` go out in
  one write and their replies are read in order; the message data still
  waits for ``DATA``'s 354, so a refusal before it transmits nothing;
* after a refusal before the data, the replies still due are read, a 354
  given with nothing to deliver gets the lone final dot, and the session is
  reset (``RSET``), unless a 421 means it is over;
* a failure at or after ``DATA`` answers only for the recipients accepted
  at ``RCPT`` (:func:`~mailspool.smtp.result.with_result`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from mailspool.errors import DeliveryError, error_for_reply
from mailspool.message import Envelope
from mailspool.smtp.esmtp import wire_address
from mailspool.smtp.result import Reply, SendResult, all_refused, with_result

__all__ = [
    "READ",
    "WRITE_MESSAGE",
    "Failed",
    "Finished",
    "Phase",
    "ProtocolViolation",
    "Read",
    "ReplyReader",
    "Transaction",
    "Write",
    "WriteMessage",
]

#: The longest reply line accepted (RFC 5321 4.5.3.1.5 allows 512 octets; relays
#: send longer texts, but a line this long is not SMTP).
MAX_LINE = 64 * 1024
#: The most lines one multi-line reply may have.
MAX_LINES = 1000


class ProtocolViolation(ValueError):
    """The relay sent something that is not an SMTP reply (the session is over)."""

    def __init__(self, why: str, line: bytes) -> None:
        super().__init__(f"{why}: {line[:200]!r}")
        self.line = line


#: Every valid reply code, so that one lookup checks a line's first three bytes.
_CODES = frozenset(str(code).encode() for code in range(100, 600))


#: Replies of one line already made, by their line: a relay answers most
#: commands with the same words each time ("250 2.1.0 Ok"), and a Reply is
#: immutable.  Bounded: lines that never repeat (a queue id) stop filling it.
_MADE: dict[bytes, Reply] = {}
_MADE_MAX = 256


class ReplyReader:
    """Bytes from the relay in, complete replies out.

    Lines end with CRLF (a bare LF is taken too); ``250-`` continues a
    reply, ``250 `` (or a bare ``250``) ends it.  Text is decoded as UTF-8,
    with undecodable bytes replaced.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[bytes] = []
        self._code: bytes | None = None

    @property
    def pending(self) -> bool:
        """True while part of a reply has been received."""
        return bool(self._buffer or self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        """Take what the relay sent; return the replies it completed, in order.

        Raises:
            ProtocolViolation: a line is not a reply line, a continuation
                changes the code, or a line or reply is absurdly long.
        """
        if not self._buffer and 0 <= data.find(b"\n") == len(data) - 1:
            # The usual read: exactly one line (the transport reads by line).
            reply = self._line(data.rstrip(b"\r\n"))
            return [] if reply is None else [reply]
        self._buffer += data
        replies: list[Reply] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise ProtocolViolation("a reply line without end", self._buffer)
                return replies
            line, self._buffer = self._buffer[:end].rstrip(b"\r"), self._buffer[end + 1 :]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        code, sep = line[:3], line[3:4]
        if len(line) > MAX_LINE:
            raise ProtocolViolation("a reply line too long", line)
        if code not in _CODES or sep not in (b"", b" ", b"-"):
            raise ProtocolViolation("not an SMTP reply", line)
        if self._code is None and sep != b"-":  # a reply of one line: the usual
            reply = _MADE.get(line)
            if reply is None:
                reply = Reply(int(code), line[4:].decode("utf-8", "replace"))
                if len(_MADE) < _MADE_MAX:
                    _MADE[line] = reply
            return reply
        if self._code is not None and code != self._code:
            raise ProtocolViolation("a continued reply changed its code", line)
        self._lines.append(line[4:])
        if sep == b"-":
            self._code = code
            if len(self._lines) > MAX_LINES:
                raise ProtocolViolation("a reply of too many lines", line)
            return None
        joined = b"\n".join(self._lines).decode("utf-8", "replace")
        self._lines, self._code = [], None
        return Reply(int(code), joined)


# --- what the transaction asks of its transport -------------------------------------------


@dataclass(frozen=True)
class Write:
    """Write these command bytes, then read the next reply."""

    data: bytes


@dataclass(frozen=True)
class WriteMessage:
    """``DATA`` was answered 354: write the message and its final dot, then read
    the reply (with the long timeout: the relay may take minutes to queue it)."""


@dataclass(frozen=True)
class Read:
    """Read the next reply (more replies to pipelined commands are due)."""


@dataclass(frozen=True)
class Finished:
    """The relay took the message for ``result.accepted``."""

    result: SendResult


@dataclass(frozen=True)
class Failed:
    """The transaction failed with ``error`` (classified; ``.result`` per recipient
    from ``DATA`` on).

    ``then`` is what the session needs: ``"rset"`` (write ``RSET``; the
    session goes on if it answers 250), ``"close"`` (the relay ended the
    session: 421) or ``"continue"`` (a complete transaction was refused
    after the final dot; the session is ready for the next one).
    """

    error: DeliveryError
    then: str


Step = Write | WriteMessage | Read | Finished | Failed


class Phase(enum.Enum):
    """Which reply the transaction waits for; the transport's timeouts follow it."""

    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    DOT = "the reply after the final dot"
    DRAIN = "a pipelined command"
    EMPTY = "the empty message"
    OVER = "nothing"

    def __str__(self) -> str:
        return self.value


#: The steps that carry nothing, made once (a transaction asks for them often).
READ = Read()
WRITE_MESSAGE = WriteMessage()


def _commands(envelope: Envelope, options: tuple[str, ...]) -> str:
    """``MAIL``, every ``RCPT`` and ``DATA``, as one text of CRLF-ended lines."""
    # Without SMTPUTF8 a non-ASCII domain goes as its A-label (esmtp.wire_address).
    sender = wire_address(envelope.sender, options)
    params = "".join(f" {o}" for o in options) if options else ""
    rcpts = "".join(f"RCPT TO:<{wire_address(r, options)}>\r\n" for r in envelope.recipients)
    return f"MAIL FROM:<{sender}>{params}\r\n{rcpts}DATA\r\n"


class Transaction:
    """One message's SMTP transaction, as a state machine (no I/O).

    Args:
        envelope: the validated envelope.
        options: the ``MAIL FROM`` parameters (``SIZE=``, ``SMTPUTF8``...).
        pipelining: send ``MAIL``, every ``RCPT`` and ``DATA`` at once (the
            relay offered PIPELINING).

    Use: write :meth:`start`'s bytes; feed each reply to :meth:`receive`
    and do what the returned step says, until :class:`Finished` or
    :class:`Failed`.  :attr:`phase` is the reply awaited; :attr:`draining`
    is true while the replies due after a refusal are read.

    Raises:
        ValueError: an address would break a command line (CR or LF);
            validated envelopes never do.
    """

    def __init__(self, envelope: Envelope, options: Sequence[str], *, pipelining: bool) -> None:
        self.envelope = envelope
        self.pipelining = pipelining
        self.options = tuple(options)
        self.encoding = "utf-8" if "SMTPUTF8" in self.options else "ascii"
        group = _commands(envelope, self.options)
        lines = len(envelope.recipients) + 2
        if group.count("\r") != lines or group.count("\n") != lines:
            # Each line ends with CRLF: any other CR or LF came with an address.
            raise ValueError("an SMTP command may not contain CR or LF")
        self._start = group if pipelining else group[: group.index("\n") + 1]
        self.phase = Phase.MAIL
        self.draining = False
        # The handler of the phase's reply (a function, so that no cycle holds self).
        self._on: Callable[[Transaction, Reply], Step] = Transaction._on_mail
        self.accepted: list[str] = []
        self.refused: dict[str, Reply] = {}
        self._next_rcpt = 0
        self._left = 0  # replies still due while draining
        self._failure: Failed | None = None

    def start(self) -> bytes:
        """The bytes to write first: ``MAIL`` (with PIPELINING, every command)."""
        return self._start.encode(self.encoding)

    def _rcpt_command(self) -> Write:
        rcpt = wire_address(self.envelope.recipients[self._next_rcpt], self.options)
        return Write(f"RCPT TO:<{rcpt}>\r\n".encode(self.encoding))

    def receive(self, reply: Reply) -> Step:
        """Take the next reply; return what to do now."""
        return self._on(self, reply)

    def _unexpected(self, r: Reply) -> Step:
        raise RuntimeError(f"no reply is expected now ({self.phase.name})")

    def _over(self, step: Finished | Failed) -> Finished | Failed:
        self.phase, self.draining, self._on = Phase.OVER, False, Transaction._unexpected
        return step

    def _on_mail(self, r: Reply) -> Step:
        if 200 <= r.code < 300:
            self.phase, self._on = Phase.RCPT, Transaction._on_rcpt
            return READ if self.pipelining else self._rcpt_command()
        error = error_for_reply(r.code, r.text, phase="mail")
        return self._refused_before_data(error, r, len(self.envelope.recipients) + 1)

    def _on_rcpt(self, r: Reply) -> Step:
        recipients = self.envelope.recipients
        rcpt = recipients[self._next_rcpt]
        self._next_rcpt += 1
        if 200 <= r.code < 300:
            self.accepted.append(rcpt)
        elif r.code == 421:
            error = error_for_reply(r.code, r.text, recipient=rcpt, phase="rcpt")
            return self._over(Failed(error, "close"))
        else:
            self.refused[rcpt] = Reply(452 if r.code == 552 else r.code, r.text)
        if self._next_rcpt < len(recipients):
            return READ if self.pipelining else self._rcpt_command()
        if not self.accepted:
            error = all_refused(recipients, self.refused)
            return self._refused_before_data(error, r, 1)
        self.phase, self._on = Phase.DATA, Transaction._on_data
        return READ if self.pipelining else Write(b"DATA\r\n")

    def _on_data(self, r: Reply) -> Step:
        if r.code == 354:
            self.phase, self._on = Phase.DOT, Transaction._on_dot
            return WRITE_MESSAGE
        error = self._answering(error_for_reply(r.code, r.text, phase="data"))
        return self._over(Failed(error, "close" if r.code == 421 else "rset"))

    def _on_dot(self, r: Reply) -> Step:
        if 200 <= r.code < 300:
            result = SendResult(tuple(self.accepted), MappingProxyType(self.refused), r)
            return self._over(Finished(result))
        error = self._answering(error_for_reply(r.code, r.text, phase="data"))
        return self._over(Failed(error, "close" if r.code == 421 else "continue"))

    def _answering(self, error: DeliveryError) -> DeliveryError:
        """``error`` with the outcome per recipient: only those accepted at RCPT."""
        return with_result(error, self.envelope.recipients, self.accepted, self.refused)

    def _refused_before_data(self, error: DeliveryError, r: Reply, due: int) -> Step:
        """A refusal before any data: read the ``due`` replies still coming, then reset."""
        if r.code == 421:
            return self._over(Failed(error, "close"))
        failure = Failed(error, "rset")
        if not self.pipelining:
            return self._over(failure)  # nothing else was sent
        self._failure, self._left = failure, due
        self.phase, self.draining, self._on = Phase.DRAIN, True, Transaction._on_drain
        return READ

    def session_lost(self) -> Failed:
        """The session broke while the replies due after a refusal were read:
        that refusal is the outcome, and the session is over."""
        assert self._failure is not None
        return self._over(Failed(self._failure.error, "close"))  # type: ignore[return-value]

    def _on_drain(self, r: Reply) -> Step:
        assert self._failure is not None
        if r.code == 421:
            return self._over(Failed(self._failure.error, "close"))
        self._left -= 1
        if self._left:
            return READ
        if r.code == 354:
            # DATA was taken with no one to deliver to: the lone final dot
            # (RFC 2920 3.1), which the relay must refuse or deliver to no one.
            self.phase, self._on = Phase.EMPTY, Transaction._on_empty
            return Write(b".\r\n")
        return self._over(self._failure)

    def _on_empty(self, r: Reply) -> Step:
        assert self._failure is not None
        return self._over(Failed(self._failure.error, "close" if r.code == 421 else "rset"))
