"""The pure rules of mailspool.smtp.esmtp: MAIL parameters, SIZE, dot-stuffing, wire bytes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailspool.errors import MessageTooLarge, PermanentError, SMTPUTF8Required
from mailspool.message import WireData, make_envelope, to_wire
from mailspool.smtp.esmtp import dot_stuff, mail_parameters, size_limit, wire_bytes

ASCII = make_envelope("a@example.org", ["b@example.org"])
WIDE = make_envelope("a@example.org", ["zoë@example.org"])
PLAIN = b"Subject: x\r\n\r\nbody\r\n"
EIGHT_BIT_BODY = "Subject: x\r\n\r\nCrème\r\n".encode()
EIGHT_BIT_HEADER = "Subject: Crème\r\n\r\nbody\r\n".encode()
ALL = {"smtputf8": "", "8bitmime": "", "size": "1000"}


@pytest.mark.parametrize(
    ("envelope", "data", "features", "expected"),
    [
        (ASCII, PLAIN, {}, []),
        (ASCII, PLAIN, ALL, [f"SIZE={len(PLAIN)}"]),
        (WIDE, PLAIN, ALL, ["SMTPUTF8", f"SIZE={len(PLAIN)}"]),
        (ASCII, EIGHT_BIT_BODY, ALL, ["BODY=8BITMIME", f"SIZE={len(EIGHT_BIT_BODY)}"]),
        (ASCII, EIGHT_BIT_BODY, {"8bitmime": ""}, ["BODY=8BITMIME"]),
        (ASCII, EIGHT_BIT_BODY, {"smtputf8": ""}, ["SMTPUTF8"]),
        (ASCII, EIGHT_BIT_HEADER, {"smtputf8": "", "8bitmime": ""}, ["SMTPUTF8", "BODY=8BITMIME"]),
        (WIDE, EIGHT_BIT_HEADER, {"smtputf8": "", "8bitmime": ""}, ["SMTPUTF8", "BODY=8BITMIME"]),
    ],
)
def test_mail_parameters(
    envelope: object, data: bytes, features: dict[str, str], expected: list[str]
) -> None:
    max_size = size_limit(features)
    assert mail_parameters(envelope, data, features, max_size, "relay:25") == expected  # type: ignore[arg-type]


def test_what_the_relay_cannot_take_is_refused_permanently() -> None:
    with pytest.raises(SMTPUTF8Required, match=re.escape("zoë@example.org")):
        mail_parameters(WIDE, PLAIN, {"8bitmime": ""}, None, "relay:25")
    with pytest.raises(PermanentError, match="8BITMIME"):
        mail_parameters(ASCII, EIGHT_BIT_BODY, {}, None, "relay:25")
    # Raw 8-bit headers never go to a relay without SMTPUTF8 (ascii_headers
    # encodes them first).
    with pytest.raises(PermanentError, match="8-bit headers"):
        mail_parameters(ASCII, EIGHT_BIT_HEADER, {"8bitmime": ""}, None, "relay:25")
    with pytest.raises(MessageTooLarge, match="at most 10 ") as info:
        mail_parameters(ASCII, PLAIN, {"size": "10"}, 10, "relay:25")
    assert info.value.enhanced == "5.3.4" and not info.value.transient


@pytest.mark.parametrize(
    ("value", "limit"),
    [("", None), ("0", None), ("1000", 1000), ("x", None), ("52428800 x", 52428800)],
)
def test_size_limit(value: str, limit: int | None) -> None:
    assert size_limit({"size": value}) == limit
    assert size_limit({}) is None


def _unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[: -len(b".\r\n")]
    return re.sub(rb"(?m)^\.", b"", body)


@given(st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a", b" ."]), min_size=1))
def test_dot_stuffing_round_trips(lines: list[bytes]) -> None:
    data = b"".join(line + b"\r\n" for line in lines)
    stuffed = dot_stuff(data)
    assert b"\r\n.\r\n" not in stuffed[:-3] and not stuffed.startswith(b".\r\n")
    assert _unstuff(stuffed) == data
    assert (
        dot_stuff(data, b"MAIL FROM:<a@example.org>\r\n")
        == stuffed + b"MAIL FROM:<a@example.org>\r\n"
    )


def test_wire_bytes_passes_crlf_data_as_is_and_normalises_the_rest() -> None:
    ready = to_wire(b"Subject: x\n\nbody\n")
    assert wire_bytes(ready) is ready
    # What the spool hands back from its own format is wire data by that
    # format (and checksummed): taken as it is, not counted again.
    trusted = WireData(b"Subject: x\n\nnot counted")
    assert wire_bytes(trusted) is trusted
    assert wire_bytes(b"Subject: x\n\nbare\rcr") == b"Subject: x\r\n\r\nbare\r\ncr\r\n"
