"""Addresses: one RFC 5321 mailbox from what the caller passed, and the envelope.

A pure core, no I/O.  :func:`parse_mailbox` accepts exactly one mailbox,
with or without a display name, and refuses CR, LF, NUL or any other
control character anywhere (header and SMTP command injection);
:func:`make_envelope` validates a sender and recipients into an
:class:`Envelope`, which says whether the relay must offer SMTPUTF8
(RFC 6531).  :mod:`mailspool.message` re-exports all three, where callers
import them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mailspool.errors import InvalidAddress

__all__ = ["Envelope", "is_ascii_dot_atom", "make_envelope", "parse_mailbox"]

_MAX_LOCAL = 64
_MAX_DOMAIN = 255
_MAX_LABEL = 63
_MAX_PATH = 256  # RFC 5321 4.5.3.1.3, the angle brackets included

# Injection first (these three are named in the error), then every other
# C0/C1 control, DEL and the Unicode line and paragraph separators.
_INJECTION = ("\r", "\n", "\0")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# atext (RFC 5322 3.2.3) and the non-ASCII characters RFC 6531/6532 add to it
# (UTF-8 can encode every code point but the surrogates).
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTF8 = "\u00a0-\ud7ff\ue000-\U0010ffff"
# The patterns below hold a class spanning all of Unicode, which takes the
# re module milliseconds each to compile: they are compiled when first used,
# so a command that parses no address (``mailspool status``) does not pay.
_PATTERNS = {
    "dot_atom": rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*\Z",
    # RFC 5321 Quoted-string: qtextSMTP or a backslash and a printable character.
    "quoted": rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"\Z',
    "label": rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?\Z",
    # A display name: words (atoms, with the dots obs-phrase allows, or quoted
    # strings), white space and comments.  Every alternative consumes one
    # character or one whole delimited token, so matching stays linear.
    "phrase": rf'(?:[ \t]|[{_ATEXT}{_UTF8}.]|"(?:[^"\\]|\\.)*"|\((?:[^()\\]|\\.)*\))*',
}


@functools.cache
def _pattern(name: str) -> re.Pattern[str]:
    """The compiled pattern ``name`` of :data:`_PATTERNS`."""
    return re.compile(_PATTERNS[name])


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope: who the message is from and whom it goes to.

    Addresses are bare mailboxes (``local@domain``), already validated.
    """

    sender: str
    recipients: tuple[str, ...]

    @property
    def smtputf8(self) -> bool:
        """True when an address is not ASCII and the relay must offer SMTPUTF8."""
        if not self.sender.isascii():
            return True
        for address in self.recipients:  # noqa: SIM110 (a loop: no generator per message)
            if not address.isascii():
                return True
        return False


def _check_characters(value: str) -> None:
    for ch in _INJECTION:
        if ch in value:
            raise InvalidAddress(value, f"contains {ch!r} (header injection)")
    m = _CONTROL.search(value)
    if m is not None:
        raise InvalidAddress(value, f"contains the control character {m.group()!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidAddress(value, "is not valid Unicode (lone surrogate)") from None


def _check_domain(domain: str, original: str) -> None:
    if len(domain.encode("utf-8")) > _MAX_DOMAIN:
        raise InvalidAddress(original, f"domain longer than {_MAX_DOMAIN} octets")
    if domain.startswith("["):
        # An address literal (RFC 5321 4.1.3): [IPv4] or [IPv6:...].
        inner = domain[1:-1] if domain.endswith("]") else ""
        try:
            if inner[:5].lower() == "ipv6:" and "%" not in inner:
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise InvalidAddress(
                original, f"{domain!r} is not an IPv4 or IPv6 address literal"
            ) from None
        return
    for label in domain.split("."):
        if not _pattern("label").match(label):
            raise InvalidAddress(original, f"domain {domain!r} has an invalid label {label!r}")
        # A non-ASCII label is limited in its ASCII (xn--) form.
        size = len(label) if label.isascii() else 4 + len(label.encode("punycode"))
        if size > _MAX_LABEL:
            raise InvalidAddress(
                original, f"domain label {label!r} longer than {_MAX_LABEL} octets"
            )


_COUNTS = {2: "two", 3: "three"}


def _check_mailbox(mailbox: str, original: str) -> str:
    if "@" not in mailbox:
        raise InvalidAddress(original, "no '@' and domain")
    local, _, domain = mailbox.rpartition("@")
    if not local:
        raise InvalidAddress(original, "empty local part")
    if not domain:
        raise InvalidAddress(original, "empty domain")
    if not (_pattern("dot_atom").match(local) or _pattern("quoted").match(local)):
        if not local.startswith('"') and "@" in local:
            n = mailbox.count("@")
            raise InvalidAddress(
                original,
                f"it has {_COUNTS.get(n, str(n))} '@' (an address has one, before the domain)",
            )
        raise InvalidAddress(original, f"local part {local!r} is neither a dot-atom nor quoted")
    # Non-ASCII white space (no-break, em, ideographic spaces) passes the
    # character classes above; it is allowed inside quotes only.
    unquoted = domain if local.startswith('"') else mailbox
    if not unquoted.isascii() and any(c.isspace() for c in unquoted):
        raise InvalidAddress(original, "white space outside quotes")
    if len(local.encode("utf-8")) > _MAX_LOCAL:
        raise InvalidAddress(original, f"local part longer than {_MAX_LOCAL} octets")
    _check_domain(domain, original)
    if len(mailbox.encode("utf-8")) > _MAX_PATH - 2:
        raise InvalidAddress(original, f"longer than {_MAX_PATH - 2} octets")
    return mailbox


def parse_mailbox(value: str) -> str:
    """Validate one address and return the bare mailbox for the envelope.

    Accepts ``jane@example.org``, ``<jane@example.org>``,
    ``Jane <jane@example.org>`` and ``"Doe, Jane" <jane@example.org>``; a
    display name with a comma or another special character must be quoted
    (unquoted, ``Doe, Jane <jane@example.org>`` is two addresses).  Quoted
    local parts (``"a b"@example.org``), address literals
    (``jane@[192.0.2.1]``) and non-ASCII addresses are accepted.  The mailbox
    is returned as written, never rewritten.

    Args:
        value: one address, as a ``str``.

    Returns:
        The mailbox, ``local@domain``.

    Raises:
        InvalidAddress: naming ``value``, for CR, LF, NUL or another control
            character anywhere (display name included), for anything that is
            not exactly one RFC 5321 mailbox (``""``, ``foo``, ``a@``, ``@b``,
            ``a@b@c``, a local part over 64 octets, a domain over 255 octets
            or with a bad label), or for a value that is not a ``str``.
    """
    if type(value) is str:
        # Applications send from the same few addresses over and over: a
        # validated address is remembered (the function is pure; refusals are
        # not cached and raise every time).
        return _parse_mailbox_cached(value)
    return _parse_mailbox(value)


@functools.lru_cache(maxsize=4096)
def _parse_mailbox_cached(value: str) -> str:
    return _parse_mailbox(value)


def _parse_mailbox(value: str) -> str:
    if not isinstance(value, str):
        raise InvalidAddress(value, f"expected str, got {type(value).__name__}")
    _check_characters(value)
    text = value.strip(" \t")
    if not text:
        raise InvalidAddress(value, "empty")
    if text.endswith(">"):
        # [display-name] "<" mailbox ">": the phrase ends at the first "<"
        # that is not inside a quoted string or a comment.
        phrase = _pattern("phrase").match(text)
        end = phrase.end() if phrase else 0
        if text[end : end + 1] != "<":
            raise InvalidAddress(
                value,
                f"unexpected {text[end]!r} in the display name (quote the name)",
            )
        mailbox = text[end + 1 : -1].strip(" \t")
        if not mailbox:
            raise InvalidAddress(value, "empty mailbox")
    else:
        mailbox = text
    return _check_mailbox(mailbox, value)


def _same_mailbox_key(mailbox: str) -> str:
    # Domains are case-insensitive, local parts are not (RFC 5321 2.4).
    local, _, domain = mailbox.rpartition("@")
    return f"{local}@{domain.lower()}"


def make_envelope(fromaddr: str, toaddrs: Iterable[str] | str) -> Envelope:
    """Validate a sender and recipients into an :class:`Envelope`.

    Args:
        fromaddr: the sender, in any form :func:`parse_mailbox` accepts.
        toaddrs: the recipients, an iterable of addresses; a single ``str``
            is taken as ONE address, never split on commas (a display name
            may contain one).

    Returns:
        The envelope with bare mailboxes.  A recipient given more than once
        (also in another spelling of the same mailbox: with a display name,
        or the domain in other letter case) is kept once, at its first place.

    Raises:
        InvalidAddress: for a bad address (naming it), a ``toaddrs`` that is
            neither a ``str`` nor an iterable of ``str``, or no recipients.
    """
    sender = parse_mailbox(fromaddr)
    if isinstance(toaddrs, str):
        given: tuple[str, ...] = (toaddrs,)
    elif isinstance(toaddrs, (bytes, bytearray, memoryview)):
        raise InvalidAddress(toaddrs, "recipients must be str, not bytes")
    else:
        try:
            given = tuple(toaddrs)
        except TypeError:
            raise InvalidAddress(
                toaddrs, "recipients must be a str or an iterable of str"
            ) from None
    if len(given) == 1:  # the usual case: nothing to keep once
        return Envelope(sender, (parse_mailbox(given[0]),))
    recipients: dict[str, str] = {}
    for addr in given:
        mailbox = parse_mailbox(addr)  # checks that addr is a str
        recipients.setdefault(_same_mailbox_key(mailbox), mailbox)
    if not recipients:
        raise InvalidAddress(toaddrs, "no recipients")
    return Envelope(sender, tuple(recipients.values()))


_ASCII_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")


def is_ascii_dot_atom(text: str) -> bool:
    """True when ``text`` is an ASCII dot-atom (RFC 5322 3.2.3), e.g. ``example.org``."""
    return _ASCII_DOT_ATOM.match(text) is not None
