"""From what the caller passed to bytes on the wire: a pure core, no I/O.

Everything ``send()`` is given is checked here, before anything joins a
transaction, so that a bad address or an unsendable message fails at
``send()`` and never at commit or, worse, in the queue processor hours later.

* :func:`parse_mailbox` / :func:`make_envelope` validate addresses
  (:mod:`mailspool.address`, re-exported here): no CR, LF, NUL or other
  control character anywhere (header and SMTP command injection), exactly
  one RFC 5321 mailbox, display names reduced to the mailbox.  The envelope
  says whether an address is not ASCII and the relay must therefore offer
  SMTPUTF8 (RFC 6531).
* :func:`to_wire` turns ``bytes``, ``str`` or an ``email.message.Message``
  into bytes with CRLF line endings only, no NUL and no line over 998 octets.
  Dot-stuffing is left to the SMTP client, which does it on the wire (doing
  it here too would double the dots).
* :func:`prepare` does both and makes sure the message has exactly one
  well-formed ``Message-Id`` and a ``Date``.  It looks only at the header
  block, with a few regular expressions; the message is never parsed by the
  ``email`` package, which is what makes enqueueing cheap.
"""

from __future__ import annotations

import copy
import email.errors
import email.utils
import os
import quopri
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message

from mailspool.address import Envelope, is_ascii_dot_atom, make_envelope, parse_mailbox
from mailspool.errors import InvalidMessage
from mailspool.priority import Priority

__all__ = [
    "MAX_LINE",
    "Envelope",
    "MessageInput",
    "Prepared",
    "WireData",
    "crlf",
    "host_name",
    "make_envelope",
    "make_msgid",
    "needs_8bit",
    "parse_mailbox",
    "prepare",
    "to_wire",
]

#: What ``send()`` accepts as a message.
MessageInput = bytes | str | Message

#: Longest line RFC 5321 allows, without the CRLF.
MAX_LINE = 998
# --- message bytes -----------------------------------------------------------


def crlf(data: bytes, *, final: bool = True) -> bytes:
    """``data`` with every line break (CRLF, bare LF, bare CR) as CRLF.

    With ``final``, it ends with one (a message must); without, a last line
    without a break keeps none (the queues of zope.sendmail and
    repoze.sendmail, which the send path completes later).
    """
    if final:
        return _crlf_lines(data)[0]
    n = data.count(b"\n")
    if n != data.count(b"\r\n") or n != data.count(b"\r"):
        data = _to_crlf(data)
    return data


def _to_crlf(data: bytes) -> bytes:
    # Faster than a regular expression: CRLF and bare CR to LF, then every
    # LF to CRLF.
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _crlf_lines(data: bytes) -> tuple[bytes, list[bytes]]:
    """:func:`crlf` of ``data``, and its lines without their line breaks.

    ``bytes.splitlines`` breaks lines where the conversion does (CRLF, bare
    LF, bare CR), so its lines are those of the result: :func:`_bad_line`
    measures them without splitting the message again.
    """
    lines = data.splitlines()
    # Every break is CRLF when there are as many LFs as CRs as breaks:
    # cheaper than counting the two-byte CRLF.
    breaks = len(lines) - (0 if data.endswith((b"\n", b"\r")) or not data else 1)
    n = data.count(b"\n")
    if n != breaks or n != data.count(b"\r"):
        data = _to_crlf(data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data, lines


def _bad_line(data: bytes, lines: list[bytes] | None = None) -> str | None:
    """What is wrong with a line of CRLF ``data`` that SMTP cannot carry.

    ``lines``, when given, are the lines of ``data`` (see :func:`_crlf_lines`).
    """
    pos = data.find(b"\0")
    if pos >= 0:
        number = data.count(b"\n", 0, pos) + 1
        return f"line {number} contains a NUL byte"
    if len(data) <= MAX_LINE:
        return None
    # Splitting is several times faster than any regular expression here.
    if lines is None:
        lines = data.splitlines()
    if max(map(len, lines), default=0) <= MAX_LINE:
        return None
    number, line = next((i, x) for i, x in enumerate(lines, 1) if len(x) > MAX_LINE)
    return (
        f"line {number} is {len(line)} octets long; SMTP allows at most {MAX_LINE}"
        " (fold long header fields; encode long body lines as quoted-printable or base64)"
    )


def _generate(message: Message) -> bytes:
    policy = message.policy.clone(linesep="\r\n")
    try:
        return crlf(message.as_bytes(policy=policy))
    except (email.errors.MessageError, UnicodeError, LookupError, ValueError) as exc:
        raise InvalidMessage(f"the message cannot be serialised: {exc}") from exc


def _reencoded(message: Message) -> Message | None:
    """A copy of ``message`` with long-lined parts made quoted-printable.

    ``None`` when no part can be re-encoded, or when the message is signed or
    encrypted (re-encoding would break the signature).
    """
    if any(
        part.get_content_type() in ("multipart/signed", "multipart/encrypted")
        for part in message.walk()
    ):
        return None
    fixed = copy.deepcopy(message)
    changed = False
    for part in fixed.walk():
        if part.is_multipart():
            continue
        cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if cte in ("base64", "quoted-printable"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or all(
            len(line) <= MAX_LINE for line in payload.splitlines()
        ):
            continue
        del part["Content-Transfer-Encoding"]
        part.set_payload(quopri.encodestring(payload).decode("ascii"))
        part["Content-Transfer-Encoding"] = "quoted-printable"
        changed = True
    return fixed if changed else None


def _encoded(message: bytes | str) -> bytes:
    if isinstance(message, str):
        try:
            return message.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise InvalidMessage(f"the message is not valid Unicode: {exc}") from None
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    raise InvalidMessage(
        f"message must be bytes, str or email.message.Message, not {type(message).__name__}"
    )


class WireData(bytes):
    """Message bytes already in wire form, as :func:`to_wire` returns them.

    What the spool hands back for sending is marked so
    (:func:`mailspool.spoolfile.decode_file`): its format keeps the message
    exactly as it goes on the wire, and the file's checksum was verified.
    The SMTP client then skips its own check of the line endings
    (:func:`mailspool.esmtp.wire_bytes`).  Nothing else differs from
    ``bytes``.
    """

    __slots__ = ()


def to_wire(message: bytes | str | Message) -> bytes:
    """The message as bytes with CRLF line endings only, ready for SMTP DATA.

    Bare LF, bare CR and mixed line endings become CRLF, and the message ends
    with CRLF.  A ``str`` is encoded as UTF-8 (lone surrogates from a
    ``surrogateescape`` decoding give back their original bytes).  A
    ``Message`` is generated with its own policy and CRLF; a part of it with
    a line over 998 octets is re-encoded as quoted-printable (on a copy: the
    caller's object is not changed), unless the message is signed or
    encrypted.  ``bytes`` and ``str`` are never re-encoded: their lines are
    sent as given or refused.  Leading dots are not stuffed: the SMTP client
    does that.

    Args:
        message: ``bytes``, ``str`` or ``email.message.Message`` (including
            ``EmailMessage``).

    Returns:
        The wire bytes.

    Raises:
        InvalidMessage: naming the line, when a line is longer than 998
            octets or holds a NUL byte; when the message is empty, cannot be
            serialised, or is of an unsupported type.
    """
    if isinstance(message, Message):
        _check_header_values(message)
        data = _generate(message)
        problem = _bad_line(data)
        if problem is not None:
            fixed = _reencoded(message)
            if fixed is not None:
                data = _generate(fixed)
                problem = _bad_line(data)
    else:
        data, lines = _crlf_lines(_encoded(message))
        problem = _bad_line(data, lines)
    if data.isspace():
        raise InvalidMessage("message is empty")
    if problem is not None:
        raise InvalidMessage(problem)
    return data


# A line break in a header value is legitimate only as folding: followed by
# a space or a tab, and not at the end of the value.
_INJECTED_BREAK = re.compile(r"\r\n(?![ \t])|\r(?![\n \t])|(?<!\r)\n(?![ \t])|\x00")


def _check_header_values(message: Message) -> None:
    """Refuse header values that would end their header early (injection).

    The modern email policies refuse CR and LF in header values when they
    are set; the compat32 policy of ``email.message.Message`` keeps them, and
    its generator writes them out as they are, so ``"<id@x>\\r\\nBcc: ..."``
    would become a header of its own, or start the body early.
    """
    for part in message.walk():
        for name, value in part.items():
            text = str(value)
            if _INJECTED_BREAK.search(text):
                raise InvalidMessage(
                    f"header {name!r} holds a line break that is not folding "
                    f"(header injection): {text!r}"
                )


def needs_8bit(data: bytes) -> bool:
    """True when the message has bytes outside 7-bit ASCII (8BITMIME needed)."""
    return not data.isascii()


# --- headers -----------------------------------------------------------------

_counter_lock = threading.Lock()
_counter = 0
_hostname: str | None = None


def host_name() -> str:
    """This host's name, made safe: letters, digits, dots and hyphens only.

    The one place mailspool cleans the host name: it is the default domain
    of Message-Ids, and (its first label) the last part of the queue's
    message names and of the processors' stats files.
    """
    # gethostname, not getfqdn: no DNS lookup (which can stall for seconds)
    # on the first send.  Uniqueness comes from the left part anyway.
    global _hostname
    if _hostname is None:
        name = re.sub(r"[^A-Za-z0-9.\-]", "-", socket.gethostname())
        labels = (label for label in name.split(".") if label)
        _hostname = ".".join(labels) or "localhost"
    return _hostname


def make_msgid(domain: str | None = None) -> str:
    """A new Message-Id, with angle brackets, unique across hosts and processes.

    The left part is the time in microseconds, the pid, a per-process counter
    and 64 random bits; the right part ``domain`` (default: this host's name).

    Args:
        domain: the right-hand side, an ASCII dot-atom such as
            ``example.org``.

    Returns:
        ``<left@domain>``, in the RFC 5322 ``msg-id`` form.

    Raises:
        ValueError: when ``domain`` is not an ASCII dot-atom.
    """
    global _counter
    if domain is None:
        domain = host_name()
    elif not is_ascii_dot_atom(domain):
        raise ValueError(f"Message-Id domain {domain!r} is not an ASCII dot-atom")
    with _counter_lock:
        _counter += 1
        n = _counter
    left = f"{time.time_ns() // 1000:x}.{os.getpid():x}.{n:x}.{secrets.token_hex(8)}"
    return f"<{left}@{domain}>"


# The header block: header fields (a name, optional white space, a colon) and
# their continuation lines, from the start up to the first other line.
_HEADER_BLOCK = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)*")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:((?:[^\r\n]*\r\n[ \t])*[^\r\n]*)\r\n", re.I | re.M)
_DATE = re.compile(rb"^date[ \t]*:", re.I | re.M)
_A = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
# RFC 5322 3.6.4: "<" dot-atom-text "@" (dot-atom-text / no-fold-literal) ">".
_MSG_ID = re.compile(
    rb"[ \t]*<(%s(?:\.%s)*@(?:%s(?:\.%s)*|\[[\x21-\x5a\x5e-\x7e]*\]))>[ \t]*\Z" % (_A, _A, _A, _A)
)


@dataclass(frozen=True)
class Prepared:
    """A message ready for the spool or the wire.

    Attributes:
        envelope: the validated envelope.
        message_id: the Message-Id without angle brackets.
        data: the message bytes, CRLF line endings, headers complete.
        priority: its class in the queue (see :mod:`mailspool.priority`).
    """

    envelope: Envelope
    message_id: str
    data: bytes
    priority: Priority = Priority.NORMAL

    @property
    def eight_bit(self) -> bool:
        """True when ``data`` is not 7-bit ASCII (the relay must offer 8BITMIME)."""
        return needs_8bit(self.data)


def prepare(
    fromaddr: str,
    toaddrs: Iterable[str] | str,
    message: bytes | str | Message,
    *,
    msgid_domain: str | None = None,
) -> Prepared:
    """Validate everything ``send()`` was given and complete the headers.

    Only the header block is examined: the header fields at the top, up to
    the first line that is not one (a ``Message-Id:`` in the body does not
    count).  Field names are matched case-insensitively and folded values
    are unfolded.  A well-formed Message-Id is kept as written; a missing one
    is added, and so is a missing ``Date``, at the end of the header block.
    A message without any header field gets a header block of its own (the
    whole text becomes the body); one that starts with an mbox ``From ``
    line is refused instead.

    Args:
        fromaddr: the envelope sender.
        toaddrs: the envelope recipients (see :func:`make_envelope`).
        message: ``bytes``, ``str`` or ``email.message.Message``.
        msgid_domain: the right-hand side of an added Message-Id (default:
            this host's name).

    Returns:
        The envelope, the Message-Id without angle brackets, and the data.

    Raises:
        InvalidAddress: for a bad sender or recipient, or no recipients.
        InvalidMessage: for a malformed or repeated Message-Id, and
            everything :func:`to_wire` refuses.
    """
    envelope = make_envelope(fromaddr, toaddrs)
    data = to_wire(message)
    if data.startswith(b"From "):
        # Not a header field: it would turn the whole message into a body.
        raise InvalidMessage("the message starts with an mbox 'From ' line; remove it")
    block = _HEADER_BLOCK.match(data)
    end = block.end() if block else 0
    headers = data[:end]
    message_id, added = _message_id(headers, msgid_domain)
    if _DATE.search(headers) is None:
        added += b"Date: " + email.utils.formatdate(localtime=True).encode() + b"\r\n"
    if added:
        if end == 0 and not data.startswith(b"\r\n"):
            added += b"\r\n"  # no header block at all: the text is the body
        data = data[:end] + added + data[end:]
    return Prepared(envelope, message_id, data)


def _message_id(headers: bytes, msgid_domain: str | None) -> tuple[str, bytes]:
    """The message's Message-Id (without angle brackets), and the field to add when
    it has none (else ``b""``).

    Raises:
        InvalidMessage: a malformed or repeated Message-Id.
    """
    values = _MESSAGE_ID.findall(headers)
    if len(values) > 1:
        raise InvalidMessage(f"{len(values)} Message-Id header fields; one at most")
    if not values:
        msgid = make_msgid(msgid_domain)
        return msgid[1:-1], b"Message-Id: " + msgid.encode("ascii") + b"\r\n"
    value = values[0].replace(b"\r\n", b"")
    m = _MSG_ID.match(value)
    if m is None:
        shown = value.strip().decode("utf-8", "replace")[:200]
        raise InvalidMessage(f"malformed Message-Id: {shown!r}")
    return m.group(1).decode("ascii"), b""
