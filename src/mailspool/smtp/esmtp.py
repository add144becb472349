"""What a message needs from the relay, and how its data goes on the wire: no I/O.

The rules of the ESMTP extensions mailspool uses, kept as plain functions so
that they can be tested without a relay and read in one place:

* **SMTPUTF8** (RFC 6531): needed when an address is not ASCII; used, when
  offered, for UTF-8 headers (RFC 6532) too.  Needed but not offered: a
  permanent error, before ``MAIL``.
* **8BITMIME** (RFC 6152): ``BODY=8BITMIME`` for data with 8-bit bytes.
  Neither it nor SMTPUTF8 offered: a permanent error rather than a message
  sent in violation of the RFC and perhaps mangled by a 7-bit hop.
* **SIZE** (RFC 1870): a message larger than the relay's limit is refused
  before ``MAIL``; otherwise ``SIZE=n`` is announced.
* The data: CRLF line endings only, a dot at the start of a line doubled
  (RFC 5321 4.5.2), the final dot added.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mailspool.errors import MessageTooLarge, PermanentError, SMTPUTF8Required
from mailspool.message import Envelope, WireData, to_wire

__all__ = ["dot_stuff", "mail_parameters", "size_limit", "wire_bytes"]

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
        if "smtputf8" not in features:
            wide = [a for a in (envelope.sender, *envelope.recipients) if not a.isascii()]
            raise SMTPUTF8Required(
                f"{where} does not offer SMTPUTF8, which the non-ASCII "
                f"address(es) {', '.join(wide)} need; the message cannot be "
                "sent through this relay"
            )
        options.append("SMTPUTF8")
    if not data.isascii():
        end = data.find(b"\r\n\r\n")
        headers = data if end < 0 else data[:end]
        if not headers.isascii() and "smtputf8" in features and "SMTPUTF8" not in options:
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
    if max_size is not None and len(data) > max_size:
        raise MessageTooLarge(
            f"the message is {len(data)} octets and {where} accepts at most {max_size} (SIZE)",
            enhanced="5.3.4",
        )
    if "size" in features:
        options.append(f"SIZE={len(data)}")
    return options
