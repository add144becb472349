"""The on-disk queue: a Maildir that survives crashes and never sends twice.

Theory of operation
-------------------

The spool is a directory with one sub-directory ("area") per state.  A
message is one file; its state is the area it is in, and it changes state by
``rename(2)``, which is atomic.  ``tmp/``, ``new/`` and ``cur/`` follow the
Maildir rules, so ``mailbox.Maildir`` opens the spool and lists what is ready
or in flight; the other areas hold what the processor needs for retries and
failures.  Every allowed move is listed once, in :data:`LIFECYCLE`.

Each file starts with ASCII lines that look like mail headers (the
envelope: sender, each recipient with its state, attempts, queued time),
followed by the message.  The first line carries the lengths of both parts
and a CRC-32 over them, so a truncated or damaged file is recognised and
moved to ``quarantine/`` instead of being sent half.  Addresses and texts are
percent-encoded UTF-8, so commas, quotes, spaces and non-ASCII round-trip
exactly.  The pure functions :func:`encode_file`, :func:`decode_file` and
:func:`settle_record` hold the format and the state rules; the
:class:`Spool` only adds the system calls.

Durability: a message is written to ``tmp/`` (``O_EXCL``, mode 0600,
fsync, checked close), renamed into ``new/`` and the directory fsynced
once per batch.  A claim is an ``flock`` on the open file plus a rename
into ``cur/``; the kernel drops the lock when its holder dies, so another
processor can take an abandoned message at once.  A change of state that
must not be lost (deferral, failure) writes the new file completely and
makes it durable before the old one is removed; the removal of a message
whose recipients were all accepted is not fsynced (speed): a crash in that
window is the only way a message is sent twice.  Finished files are renamed
into ``trash/`` and unlinked by a background thread, because freeing a
file's blocks can cost a millisecond (see the reaper below).  docs/spool.md
has the details, byte by byte.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import random
import re
import socket
import stat
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import getaddresses, parseaddr
from types import MappingProxyType, TracebackType
from urllib.parse import unquote_to_bytes

from mailspool.errors import InvalidAddress, SpoolError
from mailspool.message import Envelope, Prepared, parse_mailbox

__all__ = [
    "AREAS",
    "FORMAT_VERSION",
    "LIFECYCLE",
    "STATES",
    "TMP_MAX_AGE",
    "Claim",
    "RecipientStatus",
    "Record",
    "Spool",
    "SpoolEntry",
    "Staged",
    "decode_file",
    "encode_file",
    "next_area",
    "quote_value",
    "settle_record",
    "unquote_value",
]

log = logging.getLogger(__name__)

#: The version number written on the first line of every spool file.
FORMAT_VERSION = 1
#: Files in ``tmp/`` untouched for this long (seconds) are removed by sweep().
TMP_MAX_AGE = 36 * 3600.0

#: Area (directory) -> the state it stands for.
STATES: Mapping[str, str] = MappingProxyType(
    {
        "new": "ready",
        "cur": "in_flight",
        "deferred": "deferred",
        "hold": "held",
        "failed": "failed",
        "quarantine": "quarantined",
    }
)
#: State -> area.
AREAS: Mapping[str, str] = MappingProxyType({v: k for k, v in STATES.items()})

_ALL = frozenset(STATES)
#: The whole message lifecycle, in one place: action -> (the areas it may
#: start from, the area it ends in; None when the file is removed).
LIFECYCLE: Mapping[str, tuple[frozenset[str], str | None]] = MappingProxyType(
    {
        "publish": (frozenset({"tmp"}), "new"),  # committed, due now
        "schedule": (frozenset({"tmp"}), "deferred"),  # committed, send later
        "claim": (frozenset({"new", "deferred", "cur"}), "cur"),  # cur: abandoned only
        "release": (frozenset({"cur"}), "new"),  # claimed, untouched
        "remove": (frozenset({"cur"}), None),  # every recipient accepted
        "defer": (frozenset({"cur"}), "deferred"),  # some recipient still pending
        "fail": (frozenset({"cur"}), "failed"),  # none pending, some failed
        "quarantine": (_ALL - {"quarantine"}, "quarantine"),
        "retry": (frozenset({"deferred", "failed", "quarantine"}), "new"),
        "hold": (frozenset({"new", "deferred"}), "hold"),
        "unhold": (frozenset({"hold"}), "new"),
        "delete": (_ALL, None),  # cur/: only when abandoned
        "recover": (frozenset({"cur"}), "new"),  # sweep(): abandoned claim
        "expire": (frozenset({"tmp"}), None),  # sweep(): orphan of a crash
    }
)

PENDING, SENT, FAILED = "pending", "sent", "failed"
_STATUSES = frozenset({PENDING, SENT, FAILED})
_MAX_TEXT = 500  # characters of a relay's reply kept per recipient

_WFLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_RFLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_DFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_LOCK = fcntl.LOCK_EX | fcntl.LOCK_NB
# open() errors that are the file's fault: quarantine it.
_BAD_FILE = frozenset({errno.ELOOP, errno.EACCES, errno.EPERM, errno.ENXIO, errno.EISDIR})
_HEAD_READ = 16384


def next_area(action: str, area: str) -> str | None:
    """Where ``action`` takes a message that is in ``area``.

    Raises:
        SpoolError: naming the state and the action when the move is not allowed.
    """
    sources, target = LIFECYCLE[action]
    if area not in sources:
        state = STATES.get(area, area)
        raise SpoolError(f"cannot {action} a message that is {state}")
    return target


# --- values ----------------------------------------------------------------


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient and where its delivery stands.

    ``status`` is ``"pending"``, ``"sent"`` or ``"failed"``; ``code`` and
    ``text`` are the last reply about it (a pending recipient keeps the
    reason of its last deferral).
    """

    address: str
    status: str = PENDING
    code: int | None = None
    text: str | None = None


@dataclass(frozen=True)
class Record:
    """The envelope part of a spool file."""

    sender: str
    recipients: tuple[RecipientStatus, ...]
    queued_at: float
    attempts: int = 0
    message_id: str | None = None
    last_error: str | None = None
    legacy: bool = False

    @property
    def pending(self) -> tuple[str, ...]:
        """The recipients still to be sent to."""
        return tuple(r.address for r in self.recipients if r.status == PENDING)


@dataclass(frozen=True)
class Staged:
    """A message written and fsynced in ``tmp/``, not yet visible."""

    id: str
    message_id: str
    area: str  # "new" or "deferred"
    tmp_path: str
    not_before: float | None = None


@dataclass(frozen=True)
class SpoolEntry:
    """What the spool knows about one message, for listings and the CLI."""

    id: str
    state: str
    message_id: str | None
    sender: str
    recipients: tuple[RecipientStatus, ...]
    queued_at: float | None
    attempts: int
    next_attempt: float | None
    size: int
    last_error: str | None
    legacy: bool = False


# --- the file format (pure) ---------------------------------------------------

_SAFE_CHARS = (
    "!#$&'*+-./0123456789:=?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~"
)
_SAFE_BYTES = frozenset(_SAFE_CHARS.encode("ascii"))
_UNSAFE = re.compile(r"[^!#$&'*+\-./0-9:=?@A-Z\[\]^_`a-z{|}~]")
_QUOTED = re.compile(r"(?:[!#$&'*+\-./0-9:=?@A-Z\[\]^_`a-z{|}~]|%[0-9A-F]{2})+\Z")
_BYTE_TABLE = [chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in range(256)]


def quote_value(value: str) -> str:
    """Encode any string as one ASCII token without spaces, commas or quotes.

    The UTF-8 bytes outside a safe set of printable ASCII are written
    ``%XX``; the empty string is ``-`` (and a lone ``-`` is ``%2D``).
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
    if _QUOTED.match(token) is None:
        raise ValueError(f"bad token {token[:40]!r}")
    if "%" not in token:
        return token
    return unquote_to_bytes(token).decode("utf-8", "surrogatepass")


def _reply_tokens(code: int | None, text: str | None) -> str:
    if code is None and text is None:
        return ""
    c = "-" if code is None else str(code)
    return f" {c} {quote_value((text or '')[:_MAX_TEXT])}"


def _envelope_text(record: Record) -> str:
    lines = []
    if record.message_id is not None:
        lines.append(f"X-Mailspool-Message-Id: {quote_value(record.message_id)}\r\n")
    lines.append(f"X-Mailspool-Queued: {record.queued_at:.6f}\r\n")
    lines.append(f"X-Mailspool-Attempts: {record.attempts}\r\n")
    lines.append(f"X-Mailspool-From: {quote_value(record.sender)}\r\n")
    for r in record.recipients:
        tail = _reply_tokens(r.code, r.text)
        lines.append(f"X-Mailspool-To: {r.status} {quote_value(r.address)}{tail}\r\n")
    if record.last_error is not None:
        lines.append(f"X-Mailspool-Error: {quote_value(record.last_error[:_MAX_TEXT])}\r\n")
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


_FIRST = re.compile(rb"X-Mailspool: (\d{1,4}) (\d{1,12}) (\d{1,15}) ([0-9a-f]{8})\r\n")
_FLOAT = re.compile(r"\d{1,12}(?:\.\d{1,9})?\Z")
_INT = re.compile(r"\d{1,9}\Z")


def _parse_envelope(block: bytes) -> Record:
    text = block.decode("ascii")
    if not text.endswith("\r\n"):
        raise ValueError("envelope does not end with CRLF")
    sender: str | None = None
    queued: float | None = None
    attempts: int | None = None
    message_id: str | None = None
    last_error: str | None = None
    recipients: list[RecipientStatus] = []
    for line in text[:-2].split("\r\n"):
        key, sep, value = line.partition(": ")
        if not sep or not key.startswith("X-Mailspool-"):
            raise ValueError(f"bad envelope line {line[:60]!r}")
        if key == "X-Mailspool-To":
            parts = value.split(" ")
            if len(parts) not in (2, 4) or parts[0] not in _STATUSES:
                raise ValueError(f"bad recipient line {line[:60]!r}")
            code = text_ = None
            if len(parts) == 4:
                if parts[2] != "-":
                    if _INT.match(parts[2]) is None:
                        raise ValueError(f"bad reply code {parts[2][:10]!r}")
                    code = int(parts[2])
                text_ = unquote_value(parts[3])
            recipients.append(RecipientStatus(unquote_value(parts[1]), parts[0], code, text_))
        elif key == "X-Mailspool-From":
            sender = unquote_value(value)
        elif key == "X-Mailspool-Queued":
            if _FLOAT.match(value) is None:
                raise ValueError(f"bad queued time {value[:20]!r}")
            queued = float(value)
        elif key == "X-Mailspool-Attempts":
            if _INT.match(value) is None:
                raise ValueError(f"bad attempts {value[:20]!r}")
            attempts = int(value)
        elif key == "X-Mailspool-Message-Id":
            message_id = unquote_value(value)
        elif key == "X-Mailspool-Error":
            last_error = unquote_value(value)
        # Other X-Mailspool-* lines are from a later minor revision: ignored.
    if sender is None or queued is None or attempts is None or not recipients:
        raise ValueError("envelope incomplete (From, Queued, Attempts and To are required)")
    return Record(sender, tuple(recipients), queued, attempts, message_id, last_error)


def decode_file(raw: bytes, *, verify: bool = True, mtime: float = 0.0) -> tuple[Record, bytes]:
    """Split a spool file into its envelope and the message to send.

    Reads mailspool's own format and the files of zope.sendmail and
    repoze.sendmail (``legacy=True``; their headers are removed from the
    message, line endings become CRLF, ``mtime`` is the queued time).

    Args:
        raw: the whole file (with ``verify=False``: at least its head).
        verify: check the lengths and the CRC-32 (always, for a claim).
        mtime: the file's mtime, the queued time of a legacy file.

    Raises:
        ValueError: the file is truncated, damaged or not a spool file; the
            message says what is wrong.
    """
    m = _FIRST.match(raw)
    if m is None:
        if raw.startswith(b"X-Mailspool:"):
            raise ValueError("malformed or unsupported X-Mailspool line")
        return _decode_legacy(raw, mtime)
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
    return record, raw[start + elen :]


# --- legacy files (zope.sendmail, repoze.sendmail) ---------------------------

_EOL = re.compile(rb"\r\n|\r|\n")
_BLANK = re.compile(rb"\r?\n\r?\n")


def _crlf(data: bytes) -> bytes:
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        data = _EOL.sub(b"\r\n", data)
    return data


def _legacy_mailbox(value: str) -> str:
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


def _legacy_message_id(data: bytes) -> str | None:
    end = _BLANK.search(data)
    head = data[: end.start() if end else len(data)]
    value, _ = _header_value(head.splitlines(keepends=True), b"message-id")
    if value is None:
        return None
    mid = value.decode("ascii", "replace").strip()
    return mid[1:-1] if mid.startswith("<") and mid.endswith(">") else mid or None


def _decode_legacy(raw: bytes, mtime: float) -> tuple[Record, bytes]:
    if raw.startswith(b"X-Zope-From:"):
        # zope.sendmail: "X-Zope-From: a\n" "X-Zope-To: b, c\n" then the message.
        first, _, rest = raw.partition(b"\n")
        second, _, data = rest.partition(b"\n")
        if not second.startswith(b"X-Zope-To:"):
            raise ValueError("zope.sendmail file without an X-Zope-To line")
        sender = _legacy_mailbox(first[12:].decode("utf-8"))
        to_value = second[10:].decode("utf-8").strip()
        addrs = [a for _, a in getaddresses([to_value]) if a]
    else:
        # repoze.sendmail: X-Actually-From / X-Actually-To anywhere in the
        # header block, RFC 2047-encoded.
        end = _BLANK.search(raw)
        if end is None:
            raise ValueError("not a spool file: no X-Mailspool envelope and no header block")
        eol = 2 if raw.startswith(b"\r\n", end.start()) else 1
        lines = raw[: end.start() + eol].splitlines(keepends=True)
        from_raw, lines = _header_value(lines, b"x-actually-from")
        to_raw, lines = _header_value(lines, b"x-actually-to")
        if to_raw is None:
            raise ValueError("not a spool file: no X-Mailspool envelope and no legacy headers")
        sender = _legacy_mailbox(_rfc2047(from_raw or b""))
        addrs = [a.strip() for a in _rfc2047(to_raw).split(",") if a.strip()]
        data = b"".join(lines) + raw[end.start() + eol :]
    recipients: list[str] = []
    for addr in addrs:
        mailbox = _legacy_mailbox(addr)
        if mailbox and mailbox not in recipients:
            recipients.append(mailbox)
    if not recipients:
        raise ValueError("legacy file without recipients")
    data = _crlf(data)
    if not data.strip():
        raise ValueError("legacy file without a message")
    record = Record(
        sender,
        tuple(RecipientStatus(a) for a in recipients),
        mtime,
        message_id=_legacy_message_id(data),
        legacy=True,
    )
    return record, data


def _rfc2047(value: bytes) -> str:
    try:
        return str(make_header(decode_header(value.decode("ascii", "surrogateescape"))))
    except (LookupError, UnicodeError, HeaderParseError) as exc:  # unknown charset...
        raise ValueError(f"undecodable legacy header {value[:60]!r}: {exc}") from None


# --- state rules (pure) --------------------------------------------------------


def settle_record(
    record: Record,
    sent: Iterable[str] = (),
    failed: Mapping[str, tuple[int | None, str]] | None = None,
    deferred: Mapping[str, tuple[int | None, str]] | None = None,
) -> tuple[Record, str]:
    """Apply one attempt's per-recipient outcome; return (record, outcome).

    Outcome ``"removed"`` when every recipient was accepted, ``"deferred"``
    when some recipient is still pending (including pending recipients not
    named at all), ``"failed"`` when none is pending and some failed.  Sent
    recipients stay sent forever; the attempt count goes up by one.

    Raises:
        ValueError: an address is not a pending recipient, or is given twice.
    """
    failed = failed or {}
    deferred = deferred or {}
    sent_set = set(sent)
    pending = set(record.pending)
    named = [*sent_set, *failed, *deferred]
    if len(named) != len(set(named)):
        raise ValueError("a recipient is given more than one outcome")
    unknown = set(named) - pending
    if unknown:
        raise ValueError(f"not pending recipients of this message: {sorted(unknown)!r}")
    out: list[RecipientStatus] = []
    for r in record.recipients:
        a = r.address
        if r.status != PENDING:
            out.append(r)
        elif a in sent_set:
            out.append(RecipientStatus(a, SENT))
        elif a in failed:
            out.append(RecipientStatus(a, FAILED, *failed[a]))
        elif a in deferred:
            out.append(RecipientStatus(a, PENDING, *deferred[a]))
        else:
            out.append(r)
    if any(r.status == PENDING for r in out):
        outcome, why = "deferred", next(iter(deferred.values()), None)
    elif any(r.status == FAILED for r in out):
        outcome, why = "failed", next(iter(failed.values()), None)
    else:
        outcome, why = "removed", None
    last_error = record.last_error
    if why is not None:
        last_error = why[1] if why[0] is None else f"{why[0]} {why[1]}"
    new = replace(record, recipients=tuple(out), attempts=record.attempts + 1)
    return replace(new, last_error=last_error), outcome


# --- the trash and its reaper ------------------------------------------------------
#
# Removing a file frees its blocks, and on some file systems that waits for
# the disk: on ext4 mounted with online ``discard`` an unlink of a freshly
# fsynced file takes about a millisecond, serialised in the kernel, against
# a few microseconds for a rename.  So a finished file is renamed into
# ``trash/`` (not a state: nothing there is ever sent or listed) and a
# background thread, one per spool and process, unlinks it shortly after.


class _Reaper(threading.Thread):
    IDLE_EXIT = 10.0  # seconds without work before the thread ends

    def __init__(self, key: tuple[int, str]) -> None:
        super().__init__(name=f"mailspool-reaper {key[1]}", daemon=True)
        self.key = key
        self.wake = threading.Event()

    def run(self) -> None:
        while True:
            if not self.wake.wait(self.IDLE_EXIT):
                with _reapers_lock:
                    if not self.wake.is_set():
                        if _reapers.get(self.key) is self:
                            del _reapers[self.key]
                        return
            self.wake.clear()
            _purge(self.key[1])


_reapers: dict[tuple[int, str], _Reaper] = {}
_reapers_lock = threading.Lock()


def _reap_soon(trash: str) -> None:
    key = (os.getpid(), trash)
    with _reapers_lock:
        reaper = _reapers.get(key)
        if reaper is None:
            reaper = _reapers[key] = _Reaper(key)
            reaper.start()
        reaper.wake.set()


def _purge(trash: str) -> int:
    done = 0
    try:
        with os.scandir(trash) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    done += 1
    except OSError:
        pass  # the spool is gone, or not ours to clean
    return done


# --- names ----------------------------------------------------------------------

_seq = itertools.count(1)
_pid = os.getpid()


def _after_fork() -> None:
    global _pid, _seq, _reapers_lock
    _pid = os.getpid()
    _seq = itertools.count(1)
    _reapers_lock = threading.Lock()  # another thread may have held it at fork
    _reapers.clear()  # their threads do not exist in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

_host = re.sub(r"[^A-Za-z0-9\-_]", "-", socket.gethostname().split(".")[0]) or "localhost"


def _new_name() -> str:
    """A Maildir unique name: time, microseconds, pid, counter, random, host."""
    us = time.time_ns() // 1000
    return (
        f"{us // 1_000_000}.M{us % 1_000_000}P{_pid}Q{next(_seq)}"
        f"R{random.getrandbits(32):08x}.{_host}"
    )


def _check_id(id: str) -> None:
    if not isinstance(id, str) or not id or id[0] == "." or "/" in id or "\0" in id:
        raise ValueError(f"not a spool message id: {id!r}")


def _umask_hides_owner() -> bool:
    """True when the umask strips owner bits from 0600 (then chmod is needed)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return bool(int(line.split()[1], 8) & 0o600)
    except (OSError, ValueError, IndexError):
        pass
    return True


def _errname(exc: OSError) -> str:
    code = exc.errno or 0
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _read_all(fd: int, size: int) -> bytes:
    data = os.read(fd, size) if size else b""
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# --- the spool ---------------------------------------------------------------------


class Spool:
    """A spool directory: durable enqueue, claims, per-recipient settling.

    Args:
        path: the spool root.
        create: create the root and its areas (mode 0700) when missing;
            with ``False`` a missing root or Maildir triple raises.

    Raises:
        SpoolError: the spool does not exist (``create=False``) or cannot be
            created.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = os.fspath(path)
        root = os.path.abspath(self.path)  # immune to a later chdir()
        self._dirs = {a: os.path.join(root, a) + os.sep for a in (*STATES, "tmp", "trash")}
        self._chmod = _umask_hides_owner()
        if create and not os.path.isdir(root):
            parent = os.path.dirname(root)
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise SpoolError(exc.errno, f"cannot create {parent}: {_errname(exc)}") from exc
            self._mkdir(root)
        for area in ("tmp", "new", "cur", "deferred", "hold", "failed", "quarantine", "trash"):
            d = self._dirs[area][:-1]
            if os.path.isdir(d):
                continue
            if not create and area in ("tmp", "new", "cur"):
                raise SpoolError(errno.ENOENT, f"{self.path} is not a spool: {d} missing")
            try:
                self._mkdir(d)
            except SpoolError:
                if create:
                    raise
                # A read-only legacy queue opened for listing: fine.

    def __repr__(self) -> str:
        return f"Spool({self.path!r})"

    def _mkdir(self, path: str) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot create spool {path}: {_errname(exc)}") from exc
        os.chmod(path, 0o700)  # whatever the umask

    def _error(self, what: str, exc: OSError) -> SpoolError:
        err = SpoolError(exc.errno, f"spool {self.path}: cannot {what}: {_errname(exc)}")
        err.__cause__ = exc
        return err

    # -- writing ---------------------------------------------------------------

    def _write(self, path: str, head: bytes, data: bytes, mtime: float | None, lock: bool) -> int:
        """Create ``path`` and make ``head + data`` durable in it.

        Returns the still-open, locked fd when ``lock`` is true, else -1.  On
        any failure the file is removed and the OSError re-raised: a failed
        fsync or close is never retried (the kernel may have dropped the data).
        """
        fd = os.open(path, _WFLAGS, 0o600)
        try:
            if lock:
                fcntl.flock(fd, _LOCK)
            if self._chmod:
                os.fchmod(fd, 0o600)
            total = len(head) + len(data)
            n = os.writev(fd, (head, data))
            if n != total:
                rest = memoryview(head + data)[n:]
                while rest:
                    k = os.write(fd, rest)
                    if k <= 0:
                        raise OSError(errno.EIO, "short write")
                    rest = rest[k:]
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            os.fsync(fd)
            if lock:
                return fd
        except BaseException:
            _close_quietly(fd)
            _unlink_quietly(path)
            raise
        try:
            os.close(fd)
        except OSError:
            _unlink_quietly(path)
            raise
        return -1

    def _trash(self, path: str) -> None:
        """Take a finished file out of the spool now; it is unlinked later.

        Raises:
            OSError: the file could be neither moved nor removed.
        """
        try:
            os.rename(path, self._dirs["trash"] + _new_name())
        except OSError:
            with contextlib.suppress(FileNotFoundError):  # gone already
                os.unlink(path)  # no usable trash/: the slow way
            return
        _reap_soon(self._dirs["trash"])

    def purge(self) -> int:
        """Unlink everything in ``trash/`` now (the reaper does it anyway).

        Returns:
            How many files were removed.
        """
        return _purge(self._dirs["trash"])

    def _fsync_dir(self, area: str) -> None:
        fd = os.open(self._dirs[area], _DFLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def stage(self, prepared: Prepared, *, not_before: float | None = None) -> Staged:
        """Write a message durably into ``tmp/``, not yet visible.

        Args:
            prepared: the validated message (see :func:`mailspool.message.prepare`).
            not_before: a ``time.time()`` value; a later time makes
                publish() put the message in ``deferred/`` until then.

        Returns:
            The :class:`Staged` message to give to publish() or discard().

        Raises:
            SpoolError: the write, fsync or close failed (ENOSPC, EROFS,
                EACCES...); nothing is left behind.
        """
        name = _new_name()
        now = time.time()
        env = prepared.envelope
        lines = [
            f"X-Mailspool-Message-Id: {quote_value(prepared.message_id)}\r\n"
            f"X-Mailspool-Queued: {now:.6f}\r\n"
            f"X-Mailspool-Attempts: 0\r\n"
            f"X-Mailspool-From: {quote_value(env.sender)}\r\n"
        ]
        lines += [f"X-Mailspool-To: pending {quote_value(a)}\r\n" for a in env.recipients]
        env_bytes = "".join(lines).encode("ascii")
        data = prepared.data
        head = _first_line(env_bytes, data) + env_bytes
        later = not_before is not None and not_before > now
        tmp = self._dirs["tmp"] + name
        try:
            self._write(tmp, head, data, not_before if later else None, False)
        except OSError as exc:
            raise self._error(f"write {tmp}", exc) from exc
        return Staged(name, prepared.message_id, "deferred" if later else "new", tmp, not_before)

    def publish(self, staged: Sequence[Staged]) -> None:
        """Make staged messages visible: rename into their area, fsync it once.

        Raises:
            SpoolError: a rename or directory fsync failed.  Messages renamed
                before the failure are visible; the others stay in ``tmp/``
                for discard().
        """
        touched: list[str] = []
        error: SpoolError | None = None
        for s in staged:
            try:
                os.rename(s.tmp_path, self._dirs[s.area] + s.id)
            except OSError as exc:
                error = self._error(f"publish {s.tmp_path}", exc)
                break
            if s.area not in touched:
                touched.append(s.area)
        for area in touched:  # also after a failure: what was renamed is visible
            try:
                self._fsync_dir(area)
            except OSError as exc:
                error = error or self._error(f"fsync {self._dirs[area]}", exc)
        if error is not None:
            raise error

    def discard(self, staged: Sequence[Staged]) -> None:
        """Remove staged messages from ``tmp/``; never raises."""
        for s in staged:
            _unlink_quietly(s.tmp_path)

    # -- processing ----------------------------------------------------------------

    def due(self, now: float | None = None) -> Iterator[str]:
        """Stream the ids of the messages that can be claimed now.

        Abandoned claims in ``cur/`` first (their holder died), then
        ``new/``, then ``deferred/`` entries whose time has come.  Nothing
        but the current directory entry is held in memory; no order within
        an area is promised.  An id may turn out to be taken by the time it
        is claimed: claim() then returns None.
        """
        now = time.time() if now is None else now
        for area in ("cur", "new", "deferred"):
            d = self._dirs[area]
            try:
                it = os.scandir(d)
            except FileNotFoundError:
                continue
            with it:
                for e in it:
                    name = e.name
                    if name[0] == ".":
                        continue
                    if area == "new":
                        yield name
                    elif area == "cur":
                        if self._lock_free(d + name):
                            yield name
                    else:
                        try:
                            mtime = e.stat(follow_symlinks=False).st_mtime
                        except OSError:
                            continue
                        if mtime <= now:
                            yield name

    def _lock_free(self, path: str) -> bool:
        try:
            fd = os.open(path, _RFLAGS)
        except FileNotFoundError:
            return False
        except OSError:
            return True  # not openable: claim() will quarantine it
        try:
            fcntl.flock(fd, _LOCK)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def next_due(self) -> float | None:
        """The earliest time a deferred message is due, or None."""
        best: float | None = None
        try:
            it = os.scandir(self._dirs["deferred"])
        except FileNotFoundError:
            return None
        with it:
            for e in it:
                if e.name[0] == ".":
                    continue
                try:
                    t = e.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if best is None or t < best:
                    best = t
        return best

    def claim(self, id: str) -> Claim | None:
        """Take a message for sending: no one else can hold it until settled.

        Returns:
            A :class:`Claim`, or None when the message is held by someone
            else, is gone (already sent), or was corrupt (then it is moved
            to ``quarantine/`` with the reason, and logged once).

        Raises:
            ValueError: ``id`` is not a valid name.
            SpoolError: the spool itself failed (e.g. too many open files).
        """
        _check_id(id)
        for area in ("new", "deferred", "cur"):
            path = self._dirs[area] + id
            try:
                fd = os.open(path, _RFLAGS)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in _BAD_FILE:
                    self._quarantine(area, id, f"cannot open: {_errname(exc)}")
                    return None
                raise self._error(f"open {path}", exc) from exc
            claim: Claim | None = None
            try:
                claim = self._claim_fd(area, id, path, fd)
            except SpoolError:
                raise
            except OSError as exc:
                raise self._error(f"claim {area}/{id}", exc) from exc
            finally:
                if claim is None:  # the Claim owns the fd (and its lock) from here on
                    _close_quietly(fd)
            return claim
        return None

    def _claim_fd(self, area: str, id: str, path: str, fd: int) -> Claim | None:
        """Lock, check and take the file open on ``fd``; the caller closes
        ``fd`` unless a Claim is returned."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            self._quarantine(area, id, f"not a regular file (mode {st.st_mode:o})")
            return None
        try:
            fcntl.flock(fd, _LOCK)
        except BlockingIOError:
            return None
        try:
            now_st = os.lstat(path)
        except FileNotFoundError:
            return None  # finished and removed by someone else
        if now_st.st_ino != st.st_ino or now_st.st_dev != st.st_dev:
            return None  # the name now holds another file
        if area == "cur" and self._superseded(id):
            self._trash(path)  # left by a settle that crashed after publishing
            return None
        try:
            raw = _read_all(fd, st.st_size)
            record, data = decode_file(raw, mtime=st.st_mtime)
        except (OSError, ValueError) as exc:
            reason = _errname(exc) if isinstance(exc, OSError) else str(exc)
            self._quarantine(area, id, reason)
            return None
        if not record.pending:  # nothing left to send (written by hand?)
            if any(r.status == FAILED for r in record.recipients):
                os.rename(path, self._dirs["failed"] + id)
            else:
                self._trash(path)
            return None
        if area != "cur":
            try:
                os.rename(path, self._dirs["cur"] + id)
            except FileNotFoundError:
                return None
        return Claim(self, id, fd, record, data, area)

    def _superseded(self, id: str) -> bool:
        for area in ("deferred", "failed", "new", "hold"):
            if os.path.lexists(self._dirs[area] + id):
                return True
        return False

    def _quarantine(self, area: str, id: str, reason: str) -> bool:
        """Move ``area/id`` to quarantine/ with its reason; log once."""
        target = id
        while os.path.lexists(self._dirs["quarantine"] + target):
            target = f"{id}.{random.getrandbits(32):08x}"
        try:
            os.rename(self._dirs[area] + id, self._dirs["quarantine"] + target)
        except FileNotFoundError:
            return False  # someone else moved it first
        except OSError as exc:
            raise self._error(f"quarantine {area}/{id}", exc) from exc
        log.warning("spool %s: %s/%s quarantined: %s", self.path, area, id, reason)
        try:
            fd = os.open(
                self._dirs["quarantine"] + "." + target + ".reason",
                os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            try:
                os.write(fd, f"{time.time():.0f} {area} {reason}\n".encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("spool %s: cannot record why %s was quarantined: %s", self.path, id, exc)
        return True

    # -- admin ---------------------------------------------------------------------

    def counts(self, now: float | None = None) -> dict[str, int]:
        """How many messages each state holds, from directory entries only.

        Keys: ready, in_flight, deferred, held, failed, quarantined.  With
        ``now``, deferred messages already due are counted as ready (that
        needs one stat per deferred entry; without ``now`` no file is
        opened or stat'ed).
        """
        out = dict.fromkeys(AREAS, 0)
        for area, state in STATES.items():
            try:
                it = os.scandir(self._dirs[area])
            except FileNotFoundError:
                continue
            with it:
                for e in it:
                    if e.name[0] == ".":
                        continue
                    if now is not None and area == "deferred":
                        try:
                            if e.stat(follow_symlinks=False).st_mtime <= now:
                                out["ready"] += 1
                                continue
                        except OSError:
                            continue
                    out[state] += 1
        return out

    def entries(self, state: str | None = None) -> Iterator[SpoolEntry]:
        """Stream one :class:`SpoolEntry` per message (all states, or one).

        Only the head of each file is read; nothing is moved, a damaged
        file is listed with what is wrong in ``last_error``.

        Raises:
            ValueError: ``state`` is not one of :data:`AREAS`.
        """
        if state is not None and state not in AREAS:
            raise ValueError(f"unknown state {state!r}; one of {sorted(AREAS)}")
        areas = [AREAS[state]] if state else list(STATES)
        for area in areas:
            try:
                it = os.scandir(self._dirs[area])
            except FileNotFoundError:
                continue
            with it:
                for e in it:
                    if e.name[0] != ".":
                        entry = self._entry(area, e.name, full=False)
                        if entry is not None:
                            yield entry

    def _locate(self, id: str) -> str:
        _check_id(id)
        for area in STATES:
            if os.path.lexists(self._dirs[area] + id):
                return area
        raise KeyError(id)

    def get(self, id: str) -> SpoolEntry:
        """Everything known about one message, its checksum verified.

        Raises:
            KeyError: no such message.
            ValueError: ``id`` is not a valid name.
        """
        for _ in range(3):  # it may move between lookup and read
            entry = self._entry(self._locate(id), id, full=True)
            if entry is not None:
                return entry
        raise KeyError(id)

    def _entry(self, area: str, id: str, full: bool) -> SpoolEntry | None:
        path = self._dirs[area] + id
        state = STATES[area]
        error: str | None = None
        record: Record | None = None
        size = 0
        mtime = 0.0
        try:
            fd = os.open(path, _RFLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            error = f"cannot open: {_errname(exc)}"
        else:
            try:
                st = os.fstat(fd)
                size, mtime = st.st_size, st.st_mtime
                if not stat.S_ISREG(st.st_mode):
                    error = f"not a regular file (mode {st.st_mode:o})"
                else:
                    if full:
                        raw = _read_all(fd, size)
                    else:
                        raw = os.pread(fd, _HEAD_READ, 0)
                        m = _FIRST.match(raw)
                        if m is not None:
                            size = int(m.group(3))
                            if m.end() + int(m.group(2)) > len(raw):  # many recipients
                                raw = os.pread(fd, m.end() + int(m.group(2)), 0)
                    record, data = decode_file(raw, verify=full, mtime=mtime)
                    if full:
                        size = len(data)
            except (OSError, ValueError) as exc:
                error = _errname(exc) if isinstance(exc, OSError) else str(exc)
            finally:
                os.close(fd)
        if area == "quarantine":
            error = self._quarantine_reason(id) or error
        if record is None:
            return SpoolEntry(id, state, None, "", (), None, 0, None, size, error)
        return SpoolEntry(
            id,
            state,
            record.message_id,
            record.sender,
            record.recipients,
            record.queued_at,
            record.attempts,
            mtime if area == "deferred" else None,
            size,
            error or record.last_error,
            record.legacy,
        )

    def _quarantine_reason(self, id: str) -> str | None:
        try:
            with open(self._dirs["quarantine"] + "." + id + ".reason", "rb") as f:
                line = f.read(4096).decode("utf-8", "replace").strip()
        except OSError:
            return None
        parts = line.split(" ", 2)
        return parts[2] if len(parts) == 3 else line

    def _admin(self, action: str, id: str) -> None:
        """Move one message as an operator asked, holding its lock."""
        area = self._locate(id)
        target = next_area(action, area)
        path = self._dirs[area] + id
        try:
            fd = os.open(path, _RFLAGS)
        except FileNotFoundError:
            raise KeyError(id) from None
        except OSError:
            fd = -1  # a symlink or unreadable entry: no lock to take
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, _LOCK)
                except BlockingIOError:
                    raise SpoolError(f"cannot {action} {id}: it is being sent") from None
            if area == "failed" and target == "new":
                self._retry_failed(id, fd)
            elif target is None:
                os.unlink(path)
            else:
                os.rename(path, self._dirs[target] + id)
                self._fsync_dir(target)
            if area == "quarantine":
                _unlink_quietly(self._dirs["quarantine"] + "." + id + ".reason")
        except SpoolError:
            raise
        except OSError as exc:
            raise self._error(f"{action} {id}", exc) from exc
        except ValueError as exc:  # a failed/ file that is damaged
            raise SpoolError(f"cannot {action} {id}: {exc}") from exc
        finally:
            if fd >= 0:
                os.close(fd)

    def _retry_failed(self, id: str, fd: int) -> None:
        st = os.fstat(fd)
        record, data = decode_file(_read_all(fd, st.st_size), mtime=st.st_mtime)
        record = replace(
            record,
            recipients=tuple(
                RecipientStatus(r.address, PENDING, r.code, r.text) if r.status == FAILED else r
                for r in record.recipients
            ),
        )
        head, data = encode_file(record, data)
        tmp = self._dirs["tmp"] + _new_name()
        self._write(tmp, head, data, None, False)
        os.rename(tmp, self._dirs["new"] + id)
        self._fsync_dir("new")
        self._trash(self._dirs["failed"] + id)

    def retry(self, id: str) -> None:
        """Make a deferred, failed or quarantined message ready now.

        Failed recipients become pending again (their last reply is kept).

        Raises:
            KeyError: no such message.
            SpoolError: the message is in a state that cannot be retried.
        """
        self._admin("retry", id)

    def hold(self, id: str) -> None:
        """Keep a ready or deferred message out of the processor's way.

        Raises:
            KeyError: no such message.
            SpoolError: the message is being sent or in another state.
        """
        self._admin("hold", id)

    def release(self, id: str) -> None:
        """Make a held message ready again.

        Raises:
            KeyError: no such message.
            SpoolError: the message is not held.
        """
        self._admin("unhold", id)

    def delete(self, id: str) -> None:
        """Remove a message for good (not while it is being sent).

        Raises:
            KeyError: no such message.
            SpoolError: the message is being sent.
        """
        self._admin("delete", id)

    def sweep(self, now: float | None = None, *, tmp_max_age: float = TMP_MAX_AGE) -> int:
        """Remove orphans in ``tmp/`` and put abandoned claims back in ``new/``.

        A ``tmp/`` file is an orphan when its ctime (last change, which no
        one can set back) is older than ``tmp_max_age`` seconds; it was never
        committed, so it is never sent.

        Also has ``trash/`` emptied in the background (see purge()).

        Returns:
            How many orphans were removed plus claims recovered.
        """
        now = time.time() if now is None else now
        with contextlib.suppress(OSError), os.scandir(self._dirs["trash"]) as it:
            if next(it, None) is not None:
                _reap_soon(self._dirs["trash"])
        done = 0
        with os.scandir(self._dirs["tmp"]) as it:
            for e in it:
                try:
                    if e.stat(follow_symlinks=False).st_ctime < now - tmp_max_age:
                        os.unlink(e.path)
                        done += 1
                except FileNotFoundError:
                    continue
        for id in list(self._abandoned()):
            path = self._dirs["cur"] + id
            try:
                fd = os.open(path, _RFLAGS)
            except OSError:
                continue
            try:
                fcntl.flock(fd, _LOCK)
                if self._superseded(id):
                    self._trash(path)
                else:
                    os.rename(path, self._dirs["new"] + id)
                done += 1
            except OSError:
                continue
            finally:
                os.close(fd)
        return done

    def _abandoned(self) -> Iterator[str]:
        d = self._dirs["cur"]
        with os.scandir(d) as it:
            for e in it:
                if e.name[0] != "." and self._lock_free(d + e.name):
                    yield e.name


class Claim:
    """A message held for sending; settle it, or it goes back to ready.

    Use as a context manager: leaving the block without settle(), defer()
    or quarantine() releases the message untouched.  If the process dies,
    the kernel drops the lock and any processor can take the message again.

    Attributes:
        id: the spool id.
        message_id: the Message-Id without angle brackets, if known.
        envelope: sender and the recipients still pending (only those).
        data: the message as it goes on the wire (CRLF line endings).
        attempts: delivery attempts so far.
        queued_at: when the message entered the spool.
        legacy: read from a zope.sendmail / repoze.sendmail file.
        recipients: every recipient with its state.
        source: the area it was claimed from (new, deferred or cur).
    """

    __slots__ = (
        "_done",
        "_fd",
        "_record",
        "_spool",
        "data",
        "envelope",
        "id",
        "source",
    )

    def __init__(
        self, spool: Spool, id: str, fd: int, record: Record, data: bytes, source: str
    ) -> None:
        self._spool = spool
        self._fd = fd
        self._record = record
        self._done: str | None = None
        self.id = id
        self.data = data
        self.source = source
        self.envelope = Envelope(record.sender, record.pending)

    @property
    def message_id(self) -> str | None:
        return self._record.message_id

    @property
    def attempts(self) -> int:
        return self._record.attempts

    @property
    def queued_at(self) -> float:
        return self._record.queued_at

    @property
    def legacy(self) -> bool:
        return self._record.legacy

    @property
    def recipients(self) -> tuple[RecipientStatus, ...]:
        return self._record.recipients

    def __repr__(self) -> str:
        return f"<Claim {self.id} {self._done or 'held'}>"

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done is None:
            try:
                self.release()
            except SpoolError:
                if exc is None:
                    raise
                log.exception("spool %s: cannot release %s", self._spool.path, self.id)

    def __del__(self) -> None:
        if getattr(self, "_done", "x") is None and self._fd >= 0:
            _close_quietly(self._fd)  # the lock dies with it: due again at once

    def _start(self, action: str) -> str | None:
        if self._done is not None:
            raise SpoolError(f"cannot {action} {self.id}: already {self._done}")
        return next_area(action, "cur")

    def _finish(self, outcome: str) -> None:
        self._done = outcome
        fd, self._fd = self._fd, -1
        _close_quietly(fd)  # drops the lock

    def settle(
        self,
        *,
        sent: Iterable[str] = (),
        failed: Mapping[str, tuple[int | None, str]] | None = None,
        deferred: Mapping[str, tuple[int | None, str]] | None = None,
        retry_at: float | None = None,
    ) -> str:
        """Record one attempt's outcome per recipient.

        Args:
            sent: recipients the relay accepted; never sent to again.
            failed: recipient -> (code, text) of a permanent refusal.
            deferred: recipient -> (code, text) of a temporary one.
            retry_at: when to try the pending recipients again (default:
                now).  Pending recipients not named anywhere stay pending.

        Returns:
            ``"removed"`` (all accepted: the file is gone), ``"deferred"``
            (in ``deferred/`` until ``retry_at``) or ``"failed"`` (in
            ``failed/`` with each failed recipient's reply).

        Raises:
            ValueError: an address is not a pending recipient of this message.
            SpoolError: already settled, or the spool could not be written
                (then nothing changed and the claim is still held: leaving
                the ``with`` block releases it).
        """
        if self._done is not None:
            raise SpoolError(f"cannot settle {self.id}: already {self._done}")
        record, outcome = settle_record(self._record, sent, failed, deferred)
        if outcome == "removed":
            self._start("remove")
            path = self._spool._dirs["cur"] + self.id
            try:
                # Not fsynced: a crash before the directory reaches the disk
                # is the one window in which a message is sent twice.
                self._spool._trash(path)
            except OSError as exc:
                raise self._spool._error(f"remove {path}", exc) from exc
            self._finish(outcome)
            return outcome
        if outcome == "deferred":
            self._rewrite("defer", record, time.time() if retry_at is None else retry_at)
        else:
            self._rewrite("fail", record, None)
        return outcome

    def defer(self, retry_at: float, reason: str, *, count_attempt: bool = True) -> None:
        """Put the whole message back until ``retry_at``; no recipient changes.

        Args:
            retry_at: a ``time.time()`` value.
            reason: kept as the message's last error.
            count_attempt: add one to the attempts (False for trouble that
                was not the message's, e.g. the relay was down).

        Raises:
            SpoolError: already settled, or the spool could not be written.
        """
        record = replace(
            self._record,
            attempts=self._record.attempts + (1 if count_attempt else 0),
            last_error=reason,
        )
        self._rewrite("defer", record, retry_at)

    def _rewrite(self, action: str, record: Record, mtime: float | None) -> None:
        """Replace the claimed file by ``record`` in the action's area.

        Order: the new file is written, fsynced and locked in tmp/, renamed
        into its area, that directory fsynced; only then is the old file
        removed.  A crash before the rename leaves the old state (claimable
        at once); after it, the new state wins (a claim of the leftover
        cur/ file sees the newer one and drops it).
        """
        target = self._start(action)
        assert target is not None
        spool = self._spool
        head, data = encode_file(record, self.data)
        tmp = spool._dirs["tmp"] + _new_name()
        try:
            fd = spool._write(tmp, head, data, mtime, True)
        except OSError as exc:
            raise spool._error(f"write {tmp}", exc) from exc
        try:
            os.rename(tmp, spool._dirs[target] + self.id)
        except OSError as exc:
            _close_quietly(fd)
            _unlink_quietly(tmp)
            raise spool._error(f"move {self.id} to {target}/", exc) from exc
        # From here on the new state is the message: never release the old one.
        error: SpoolError | None = None
        try:
            spool._fsync_dir(target)
        except OSError as exc:
            error = spool._error(f"fsync {spool._dirs[target]}", exc)
        with contextlib.suppress(OSError):
            spool._trash(spool._dirs["cur"] + self.id)
        _close_quietly(fd)
        self._finish("deferred" if action == "defer" else "failed")
        if error is not None:
            raise error

    def release(self) -> None:
        """Give the message back untouched (ready at once, attempts unchanged).

        Raises:
            SpoolError: already settled, or the rename failed (the message
                then stays in cur/, where it is due again once unlocked).
        """
        target = self._start("release")
        assert target is not None
        spool = self._spool
        try:
            os.rename(spool._dirs["cur"] + self.id, spool._dirs[target] + self.id)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._finish("released")
            raise spool._error(f"release {self.id}", exc) from exc
        self._finish("released")

    def quarantine(self, reason: str) -> None:
        """Move the message to quarantine/ with ``reason``; it is never sent.

        Raises:
            SpoolError: already settled, or the rename failed.
        """
        self._start("quarantine")
        try:
            self._spool._quarantine("cur", self.id, reason)
        finally:
            self._finish("quarantined")
