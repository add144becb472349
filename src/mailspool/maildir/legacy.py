"""Queue files written by zope.sendmail and repoze.sendmail (no I/O).

Users migrate with mail still in their old queue, so a spool file without
mailspool's own first line is read the way those packages wrote it:

* zope.sendmail: an ``X-Zope-From: SENDER`` line and an ``X-Zope-To: A, B``
  line (LF-terminated), then the message as the application gave it;
* repoze.sendmail: ``X-Actually-From`` and ``X-Actually-To`` headers
  (RFC 2047-encoded, recipients comma-separated) somewhere in the message's
  header block.

Either way the result is the bare sender and recipient mailboxes, the
Message-Id if there is one, and the message without those lines, with CRLF
line endings, ready for the wire.  :func:`mailspool.spoolfile.decode_file`
turns that into a record (``legacy=True``).
"""

from __future__ import annotations

import re
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import getaddresses, parseaddr
from typing import NamedTuple

from mailspool.errors import InvalidAddress
from mailspool.message import crlf, parse_mailbox

__all__ = ["LegacyMessage", "decode_legacy"]

_BLANK = re.compile(rb"\r?\n\r?\n")


class LegacyMessage(NamedTuple):
    """What a zope.sendmail or repoze.sendmail queue file holds."""

    sender: str  # the bare mailbox; "" for the null reverse-path
    recipients: tuple[str, ...]  # bare mailboxes, in order, without duplicates
    message_id: str | None  # without angle brackets
    data: bytes  # the message without the legacy lines, CRLF line endings


def decode_legacy(raw: bytes) -> LegacyMessage:
    """Read a queue file written by zope.sendmail or repoze.sendmail.

    Args:
        raw: the whole file.

    Returns:
        The envelope and the message.

    Raises:
        ValueError: the file is neither (no legacy envelope), or its
            addresses or headers cannot be used; the message says why.
    """
    if raw.startswith(b"X-Zope-From:"):
        # zope.sendmail: "X-Zope-From: a\n" "X-Zope-To: b, c\n" then the message.
        first, _, rest = raw.partition(b"\n")
        second, _, data = rest.partition(b"\n")
        if not second.startswith(b"X-Zope-To:"):
            raise ValueError("zope.sendmail file without an X-Zope-To line")
        sender = _mailbox(_utf8(first[12:]))
        addrs = [a for _, a in getaddresses([_utf8(second[10:]).strip()]) if a]
    else:
        end = _BLANK.search(raw)
        if end is None:
            raise ValueError("not a spool file: no X-Mailspool envelope and no header block")
        eol = 2 if raw.startswith(b"\r\n", end.start()) else 1
        lines = raw[: end.start() + eol].splitlines(keepends=True)
        from_raw, lines = _header_value(lines, b"x-actually-from")
        to_raw, lines = _header_value(lines, b"x-actually-to")
        if to_raw is None:
            raise ValueError("not a spool file: no X-Mailspool envelope and no legacy headers")
        sender = _mailbox(_rfc2047(from_raw or b""))
        addrs = [a.strip() for a in _rfc2047(to_raw).split(",") if a.strip()]
        data = b"".join(lines) + raw[end.start() + eol :]
    recipients: list[str] = []
    for addr in addrs:
        mailbox = _mailbox(addr)
        if mailbox and mailbox not in recipients:
            recipients.append(mailbox)
    if not recipients:
        raise ValueError("legacy file without recipients")
    data = crlf(data, final=False)
    if not data.strip():
        raise ValueError("legacy file without a message")
    return LegacyMessage(sender, tuple(recipients), _message_id(data), data)


def _utf8(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"legacy envelope line is not UTF-8: {value[:60]!r}") from exc


def _mailbox(value: str) -> str:
    """An address as the old queues stored it, reduced to the bare mailbox."""
    value = value.strip()
    if not value:
        return ""  # the null reverse-path
    try:
        return parse_mailbox(value)
    except InvalidAddress:
        addr = parseaddr(value)[1]
        if not addr:
            raise ValueError(f"unusable address {value[:80]!r}") from None
        try:
            return parse_mailbox(addr)
        except InvalidAddress as exc:
            raise ValueError(f"unusable address {value[:80]!r}: {exc.reason}") from None


def _header_value(headers: list[bytes], name: bytes) -> tuple[bytes | None, list[bytes]]:
    """Find header ``name`` in a list of lines (with their EOLs); return its
    unfolded value and the lines without it."""
    lname = name.lower() + b":"
    value: bytes | None = None
    kept: list[bytes] = []
    skipping = False
    for line in headers:
        if skipping and line[:1] in (b" ", b"\t"):
            value = (value or b"") + b" " + line.strip()
            continue
        skipping = False
        if value is None and line[: len(lname)].lower() == lname:
            value = line[len(lname) :].strip()
            skipping = True
            continue
        kept.append(line)
    return value, kept


def _message_id(data: bytes) -> str | None:
    end = _BLANK.search(data)
    head = data[: end.start() if end else len(data)]
    value, _ = _header_value(head.splitlines(keepends=True), b"message-id")
    if value is None:
        return None
    mid = value.decode("ascii", "replace").strip()
    return mid[1:-1] if mid.startswith("<") and mid.endswith(">") else mid or None


def _rfc2047(value: bytes) -> str:
    try:
        return str(make_header(decode_header(value.decode("ascii", "surrogateescape"))))
    except (LookupError, UnicodeError, HeaderParseError) as exc:  # unknown charset...
        raise ValueError(f"undecodable legacy header {value[:60]!r}: {exc}") from None
