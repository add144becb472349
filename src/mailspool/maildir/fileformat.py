"""The spool file format: bytes in, a record and a message out (no I/O).

A spool file is ASCII lines that look like mail headers (the envelope:
sender, each recipient with its state, attempts, queued time), followed by
the message exactly as it goes on the wire.  The first line carries the
lengths of both parts and a CRC-32 over them, so a file that was cut short,
extended or damaged is recognised before anything is sent.  Addresses and
texts are percent-encoded UTF-8 ("tokens"), so commas, quotes, spaces and
non-ASCII round-trip exactly and every envelope line splits on a space.

Everything here is a pure function of its arguments, so the format has its
own tests, independent of any disk.  Files written by zope.sendmail and
repoze.sendmail are recognised by :func:`decode_file` too (see
:mod:`mailspool.maildir.legacy`).  docs/spool.md describes the format byte by byte.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from urllib.parse import unquote_to_bytes

from mailspool.maildir.legacy import decode_legacy
from mailspool.message import WireData
from mailspool.queue import FAILED, PENDING, SENT, STATUSES, RecipientStatus, Record

__all__ = [
    "FAILED",
    "FORMAT_VERSION",
    "MAX_TEXT",
    "PENDING",
    "SENT",
    "STATUSES",
    "RecipientStatus",
    "Record",
    "decode_file",
    "encode_file",
    "encode_head",
    "head_size",
    "quote_value",
    "unquote_value",
]

#: The version number written on the first line of every spool file.
FORMAT_VERSION = 1
#: Characters of a relay's reply kept per recipient (and of a last error).
MAX_TEXT = 500

# --- tokens ------------------------------------------------------------------

_SAFE_CHARS = (
    "!#$&'*+-./0123456789:=?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~"
)
_SAFE_BYTES = frozenset(_SAFE_CHARS.encode("ascii"))
_UNSAFE = re.compile(r"[^!#$&'*+\-./0-9:=?@A-Z\[\]^_`a-z{|}~]")
_QUOTED = re.compile(r"(?:[!#$&'*+\-./0-9:=?@A-Z\[\]^_`a-z{|}~]|%[0-9A-F]{2})+\Z")
# The same without escapes: a plain run of safe characters, several times
# faster to check than the alternation above (most tokens have no "%").
_PLAIN = re.compile(r"[!#$&'*+\-./0-9:=?@A-Z\[\]^_`a-z{|}~]+")
_BYTE_TABLE = [chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in range(256)]


def quote_value(value: str) -> str:
    """Encode any string as one ASCII token without spaces, commas or quotes.

    The UTF-8 bytes outside a safe set of printable ASCII are written
    ``%XX``; the empty string is ``-`` (and a lone ``-`` is ``%2D``).

    Args:
        value: any string (lone surrogates included).

    Returns:
        The token.
    """
    if not value:
        return "-"
    if _UNSAFE.search(value) is None:
        return "%2D" if value == "-" else value
    return "".join([_BYTE_TABLE[b] for b in value.encode("utf-8", "surrogatepass")])


def unquote_value(token: str) -> str:
    """The inverse of :func:`quote_value`.

    Raises:
        ValueError: when ``token`` is not something quote_value() writes.
    """
    if token == "-":
        return ""
    if "%" not in token:
        if _PLAIN.fullmatch(token) is None:
            raise ValueError(f"bad token {token[:40]!r}")
        return token
    if _QUOTED.match(token) is None:
        raise ValueError(f"bad token {token[:40]!r}")
    return unquote_to_bytes(token).decode("utf-8", "surrogatepass")


# --- encoding ------------------------------------------------------------------


def _reply_tokens(code: int | None, text: str | None) -> str:
    if code is None and text is None:
        return ""
    c = "-" if code is None else str(code)
    return f" {c} {quote_value((text or '')[:MAX_TEXT])}"


def _envelope_text(record: Record) -> str:
    lines = []
    if record.message_id is not None:
        lines.append(f"X-Mailspool-Message-Id: {quote_value(record.message_id)}\r\n")
    lines.append(f"X-Mailspool-Queued: {record.queued_at:.6f}\r\n")
    if record.not_before is not None:
        lines.append(f"X-Mailspool-Not-Before: {record.not_before:.6f}\r\n")
    lines.append(f"X-Mailspool-Attempts: {record.attempts}\r\n")
    lines.append(f"X-Mailspool-From: {quote_value(record.sender)}\r\n")
    for r in record.recipients:
        tail = _reply_tokens(r.code, r.text)
        lines.append(f"X-Mailspool-To: {r.status} {quote_value(r.address)}{tail}\r\n")
    if record.last_error is not None:
        lines.append(f"X-Mailspool-Error: {quote_value(record.last_error[:MAX_TEXT])}\r\n")
    return "".join(lines)


def _first_line(env: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(env))
    return b"X-Mailspool: %d %d %d %08x\r\n" % (FORMAT_VERSION, len(env), len(data), crc)


def encode_file(record: Record, data: bytes) -> tuple[bytes, bytes]:
    """The spool file for ``record`` and message ``data``, as (head, data).

    The file is ``head + data``; it is returned in two parts so that the
    message is written with ``writev`` and never copied.
    """
    env = _envelope_text(record).encode("ascii")
    return _first_line(env, data) + env, data


def encode_head(
    sender: str,
    recipients: Iterable[str],
    message_id: str,
    queued_at: float,
    data: bytes,
    not_before: float | None = None,
) -> bytes:
    """The head of a new message's file (all recipients pending, no attempt).

    The same bytes as ``encode_file(Record(...), data)[0]`` without building
    the record: the enqueue path calls it once per message.
    """
    later = "" if not_before is None else f"X-Mailspool-Not-Before: {not_before:.6f}\r\n"
    lines = [
        f"X-Mailspool-Message-Id: {quote_value(message_id)}\r\n"
        f"X-Mailspool-Queued: {queued_at:.6f}\r\n"
        f"{later}"
        f"X-Mailspool-Attempts: 0\r\n"
        f"X-Mailspool-From: {quote_value(sender)}\r\n"
    ]
    lines += [f"X-Mailspool-To: pending {quote_value(a)}\r\n" for a in recipients]
    env = "".join(lines).encode("ascii")
    return _first_line(env, data) + env


# --- decoding ------------------------------------------------------------------

_FIRST = re.compile(rb"X-Mailspool: (\d{1,4}) (\d{1,12}) (\d{1,15}) ([0-9a-f]{8})\r\n")
_FLOAT = re.compile(r"\d{1,12}(?:\.\d{1,9})?\Z")
_INT = re.compile(r"\d{1,9}\Z")


def head_size(raw: bytes) -> tuple[int, int] | None:
    """How much of a file to read to decode its envelope (``verify=False``).

    Args:
        raw: the first bytes of a file (the first line at least).

    Returns:
        (bytes of the first line and the envelope, bytes of the message), or
        None when ``raw`` does not start with mailspool's first line.
    """
    m = _FIRST.match(raw)
    if m is None:
        return None
    return m.end() + int(m.group(2)), int(m.group(3))


def _recipient(line: str, value: str) -> RecipientStatus:
    parts = value.split(" ")
    if len(parts) not in (2, 4) or parts[0] not in STATUSES:
        raise ValueError(f"bad recipient line {line[:60]!r}")
    code = text = None
    if len(parts) == 4:
        if parts[2] != "-":
            if _INT.match(parts[2]) is None:
                raise ValueError(f"bad reply code {parts[2][:10]!r}")
            code = int(parts[2])
        text = unquote_value(parts[3])
    return RecipientStatus(unquote_value(parts[1]), parts[0], code, text)


def _float(value: str, what: str) -> float:
    if _FLOAT.match(value) is None:
        raise ValueError(f"bad {what} {value[:20]!r}")
    return float(value)


def _int(value: str, what: str) -> int:
    if _INT.match(value) is None:
        raise ValueError(f"bad {what} {value[:20]!r}")
    return int(value)


def _parse_envelope(block: bytes) -> Record:
    text = block.decode("ascii")
    if not text.endswith("\r\n"):
        raise ValueError("envelope does not end with CRLF")
    sender: str | None = None
    queued: float | None = None
    not_before: float | None = None
    attempts: int | None = None
    message_id: str | None = None
    last_error: str | None = None
    recipients: list[RecipientStatus] = []
    for line in text[:-2].split("\r\n"):
        key, sep, value = line.partition(": ")
        if not sep or not key.startswith("X-Mailspool-"):
            raise ValueError(f"bad envelope line {line[:60]!r}")
        if key == "X-Mailspool-To":
            recipients.append(_recipient(line, value))
        elif key == "X-Mailspool-From":
            sender = unquote_value(value)
        elif key == "X-Mailspool-Queued":
            queued = _float(value, "queued time")
        elif key == "X-Mailspool-Not-Before":
            not_before = _float(value, "not-before time")
        elif key == "X-Mailspool-Attempts":
            attempts = _int(value, "attempts")
        elif key == "X-Mailspool-Message-Id":
            message_id = unquote_value(value)
        elif key == "X-Mailspool-Error":
            last_error = unquote_value(value)
        # Other X-Mailspool-* lines are from a later minor revision: ignored.
    if sender is None or queued is None or attempts is None or not recipients:
        raise ValueError("envelope incomplete (From, Queued, Attempts and To are required)")
    return Record(
        sender, tuple(recipients), queued, attempts, message_id, last_error, not_before=not_before
    )


def decode_file(raw: bytes, *, verify: bool = True, mtime: float = 0.0) -> tuple[Record, bytes]:
    """Split a spool file into its envelope and the message to send.

    Reads mailspool's own format and the files of zope.sendmail and
    repoze.sendmail (``legacy=True``; their headers are removed from the
    message, line endings become CRLF, ``mtime`` is the queued time).

    Args:
        raw: the whole file (with ``verify=False``: at least its head).
        verify: check the lengths and the CRC-32 (always, for a claim).
        mtime: the file's mtime, the queued time of a legacy file.

    Returns:
        (the record, the message as it goes on the wire; marked as
        :class:`~mailspool.message.WireData` when the file is in
        mailspool's own format, which keeps it that way).

    Raises:
        ValueError: the file is truncated, damaged or not a spool file; the
            message says what is wrong.
    """
    m = _FIRST.match(raw)
    if m is None:
        if raw.startswith(b"X-Mailspool:"):
            raise ValueError("malformed or unsupported X-Mailspool line")
        old = decode_legacy(raw)
        recipients = tuple(RecipientStatus(a) for a in old.recipients)
        record = Record(old.sender, recipients, mtime, message_id=old.message_id, legacy=True)
        return record, old.data  # checked again when sent
    if int(m.group(1)) != FORMAT_VERSION:
        raise ValueError(f"unsupported format version {int(m.group(1))}")
    start = m.end()
    elen, mlen = int(m.group(2)), int(m.group(3))
    if verify:
        if len(raw) != start + elen + mlen:
            raise ValueError(
                f"truncated or extended: {len(raw)} bytes, header says {start + elen + mlen}"
            )
        if zlib.crc32(memoryview(raw)[start:]) != int(m.group(4), 16):
            raise ValueError("checksum mismatch (file damaged)")
    elif len(raw) < start + elen:
        raise ValueError("truncated inside the envelope")
    record = _parse_envelope(raw[start : start + elen])
    return record, WireData(memoryview(raw)[start + elen :])
