"""What a message needs from the relay, and how its data goes on the wire: no I/O.

The rules of the ESMTP extensions mailspool uses, kept as plain functions so
that they can be tested without a relay and read in one place:

* **SMTPUTF8** (RFC 6531): needed when an address is not ASCII; used, when
  offered, for UTF-8 headers (RFC 6532) too.  Not offered: an address
  whose only non-ASCII part is its domain goes with the domain's IDNA
  A-label (``xn--...``, RFC 5890) instead; one with a non-ASCII local part
  cannot go, a permanent error before ``MAIL``.  UTF-8 headers are
  encoded as RFC 2047 encoded words (:func:`ascii_headers`), never sent
  as raw 8-bit to a relay that did not offer SMTPUTF8.
* **8BITMIME** (RFC 6152): ``BODY=8BITMIME`` for data with 8-bit bytes.
  Neither it nor SMTPUTF8 offered: a permanent error rather than a message
  sent in violation of the RFC and perhaps mangled by a 7-bit hop.
* **SIZE** (RFC 1870): a message larger than the relay's limit is refused
  before ``MAIL``; otherwise ``SIZE=n`` is announced.
* The data: CRLF line endings only, a dot at the start of a line doubled
  (RFC 5321 4.5.2), the final dot added.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable, Mapping
from email.header import Header

from mailspool.errors import MessageTooLarge, PermanentError, SMTPUTF8Required
from mailspool.message import Envelope, WireData, to_wire

__all__ = [
    "ascii_address",
    "ascii_headers",
    "dot_stuff",
    "mail_parameters",
    "size_limit",
    "wire_address",
    "wire_bytes",
]

_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")


def wire_bytes(data: bytes) -> bytes:
    """``data`` as CRLF-only bytes ending in CRLF (returned as is when already so).

    Bytes that :func:`mailspool.message.to_wire` produced pass unchanged
    (three counts, no copy; none for :class:`~mailspool.message.WireData`);
    anything else goes through ``to_wire``.
    """
    if type(data) is WireData:
        return data
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf or not data.endswith(b"\r\n"):
        return to_wire(data)
    return data


def dot_stuff(data: bytes, then: bytes = b"") -> bytes:
    """Double each dot that starts a line (RFC 5321 4.5.2) and add the final ``.CRLF``.

    ``then`` (what is written after the final dot, if anything) is appended
    in the same copy.
    """
    if data.startswith(b".") or b"\n." in data:
        data = _DOT_AT_LINE_START.sub(b"..", data)
    return b"".join((data, b".\r\n", then))


def size_limit(features: Mapping[str, str]) -> int | None:
    """The relay's SIZE limit in octets from its EHLO keywords, or ``None`` (none or 0)."""
    words = features.get("size", "").split()
    if words and words[0].isdigit() and int(words[0]) > 0:
        return int(words[0])
    return None


def mail_parameters(
    envelope: Envelope,
    data: bytes,
    features: Mapping[str, str],
    max_size: int | None,
    where: str,
) -> list[str]:
    """The ``MAIL FROM`` parameters for this message on a relay offering ``features``.

    Args:
        envelope: the validated envelope.
        data: the message's wire bytes.
        features: the relay's EHLO keywords (lower case) and their arguments.
        max_size: the relay's SIZE limit, or ``None``.
        where: the relay, for error texts.

    Returns:
        The parameters in order (``SMTPUTF8``, ``BODY=8BITMIME``, ``SIZE=n``).

    Raises:
        SMTPUTF8Required: an address is not ASCII and the relay does not
            offer SMTPUTF8.
        PermanentError: the data has 8-bit bytes and the relay offers
            neither 8BITMIME nor SMTPUTF8.
        MessageTooLarge: the message is larger than the relay's SIZE.
    """
    options: list[str] = []
    if envelope.smtputf8:
        _check_addresses(envelope, features, where)
        if "smtputf8" in features:
            options.append("SMTPUTF8")
    if not data.isascii():
        _eight_bit(data, features, where, options)
    if max_size is not None and len(data) > max_size:
        raise MessageTooLarge(
            f"the message is {len(data)} octets and {where} accepts at most {max_size} (SIZE)",
            enhanced="5.3.4",
        )
    if "size" in features:
        options.append(f"SIZE={len(data)}")
    return options


def _check_addresses(envelope: Envelope, features: Mapping[str, str], where: str) -> None:
    """Refuse non-ASCII addresses that a relay without SMTPUTF8 cannot take."""
    if "smtputf8" in features:
        return
    # Domains can go as A-labels; a local part has no ASCII form.
    addresses = (envelope.sender, *envelope.recipients)
    wide = [a for a in addresses if ascii_address(a) is None]
    if wide:
        raise SMTPUTF8Required(
            f"{where} does not offer SMTPUTF8, which the non-ASCII "
            f"address(es) {', '.join(wide)} need (a local part has no "
            "ASCII form); the message cannot be sent through this relay"
        )


def _eight_bit(data: bytes, features: Mapping[str, str], where: str, options: list[str]) -> None:
    """Add what 8-bit ``data`` needs to ``options``; refuse it when the relay cannot take it."""
    end = data.find(b"\r\n\r\n")
    headers = data if end < 0 else data[:end]
    if not headers.isascii() and "smtputf8" not in features:
        # ascii_headers() encodes them before this check; never raw 8-bit.
        raise PermanentError(f"the message has 8-bit headers and {where} does not offer SMTPUTF8")
    if not headers.isascii() and "SMTPUTF8" not in options:
        # RFC 6532 headers: use SMTPUTF8 when offered; otherwise
        # BODY=8BITMIME below, which most relays accept.
        options.append("SMTPUTF8")
    if "8bitmime" in features:
        options.append("BODY=8BITMIME")
    elif "smtputf8" in features:
        # An SMTPUTF8 relay takes 8-bit data (RFC 6531 requires 8BITMIME).
        if "SMTPUTF8" not in options:
            options.append("SMTPUTF8")
    else:
        raise PermanentError(
            f"the message has 8-bit content and {where} does not offer "
            "8BITMIME; encode the body as quoted-printable or base64"
        )


def ascii_address(address: str) -> str | None:
    """``address`` with an IDNA A-label for a non-ASCII domain (RFC 5890).

    Returns:
        The address unchanged when ASCII; ``local@xn--...`` when only the
        domain is not; None when the local part is not ASCII (no ASCII form
        exists) or the domain has no IDNA form.
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return None


def wire_address(address: str, options: Iterable[str]) -> str:
    """The form of ``address`` for ``MAIL``/``RCPT`` with these MAIL parameters.

    Without ``SMTPUTF8`` a non-ASCII domain goes as its A-label;
    :func:`mail_parameters` has refused an address without an ASCII form.
    """
    if address.isascii() or "SMTPUTF8" in options:
        return address
    return ascii_address(address) or address


#: Header fields whose value is a list of addresses (RFC 5322 3.6.2, 3.6.3, 3.6.6).
_ADDRESS_FIELDS = frozenset(
    [
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "resent-from",
        "resent-sender",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "disposition-notification-to",
        "mail-followup-to",
        "mail-reply-to",
    ]
)


def ascii_headers(data: bytes, features: Mapping[str, str], where: str) -> bytes:
    """``data`` with UTF-8 header fields made ASCII, for a relay without SMTPUTF8.

    Only the fields that are not ASCII change; the body and every other byte
    stay as they are.  Unstructured fields (Subject, Comments...) become RFC
    2047 encoded words; in address fields the display names do, and the
    domains become IDNA A-labels.

    Args:
        data: the message's wire bytes.
        features: the relay's EHLO keywords; with ``smtputf8`` nothing changes.
        where: the relay, for error texts.

    Returns:
        ``data`` itself when nothing needs to change, else the new bytes.

    Raises:
        PermanentError: a header is not UTF-8, or an address in a header
            has a non-ASCII local part: only a relay with SMTPUTF8 can take it.
    """
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    if head.isascii() or "smtputf8" in features:
        return data
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise PermanentError(
            f"the message's headers have 8-bit bytes that are not UTF-8, and {where} "
            "does not offer SMTPUTF8; encode them as RFC 2047 encoded words"
        ) from None
    fields: list[str] = []
    for line in text.split("\r\n")[:-1]:
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += "\r\n" + line
        else:
            fields.append(line)
    out = "".join(_ascii_field(f, where) + "\r\n" for f in fields)
    return out.encode("ascii") + data[len(head) :]


def _ascii_field(field: str, where: str) -> str:
    if field.isascii():
        return field
    name, colon, value = field.partition(":")
    if not colon or not name.isascii():
        raise PermanentError(f"a header line is not ASCII and {where} does not offer SMTPUTF8")
    value = " ".join(value.replace("\r\n", "").split())
    if name.strip().lower() not in _ADDRESS_FIELDS:
        encoded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
        return f"{name}: {encoded}"
    parts = []
    for display, address in email.utils.getaddresses([value]):
        plain = ascii_address(address) if address else None
        if plain is None:
            raise PermanentError(
                f"the {name} header has the address {address or value!r}, which has no "
                f"ASCII form, and {where} does not offer SMTPUTF8"
            )
        parts.append(email.utils.formataddr((display, plain), charset="utf-8"))
    return f"{name}: {', '.join(parts)}"
