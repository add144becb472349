"""Property tests: whatever the addresses and texts, the envelope round-trips."""

from __future__ import annotations

import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailspool.errors import InvalidAddress
from mailspool.maildir.fileformat import encode_head, head_size
from mailspool.maildir.spool import (
    RecipientStatus,
    Record,
    Spool,
    decode_file,
    encode_file,
    quote_value,
    unquote_value,
)
from mailspool.message import WireData, make_envelope, parse_mailbox, prepare

_ATEXT = st.sampled_from([*"aZ09!#$%&'*+/=?^_`{|}~-", "é", "ß", "日", "🙂"])
_DOT_ATOM = st.lists(st.text(_ATEXT, min_size=1, max_size=6), min_size=1, max_size=3).map(".".join)
# Quoted local parts: spaces, commas, quotes (escaped), %, anything printable.
_QCHAR = st.one_of(
    st.characters(
        blacklist_categories=("Cs", "Cc"),  # type: ignore[arg-type]
        blacklist_characters='"\\\r\n',
    ),
    st.sampled_from(['\\"', "\\\\", ",", " ", "%", "%41", "'"]),
)
_QUOTED = st.lists(_QCHAR, max_size=12).map(lambda cs: '"' + "".join(cs) + '"')
_LABEL = st.text(st.sampled_from([*"abz09-", "ü", "é"]), min_size=1, max_size=8).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=3).map(".".join)


def _valid(addr: str) -> bool:
    try:
        return parse_mailbox(addr) == addr
    except InvalidAddress:
        return False


ADDRESS = st.builds(lambda lp, d: f"{lp}@{d}", st.one_of(_DOT_ATOM, _QUOTED), _DOMAIN).filter(
    _valid
)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)  # type: ignore[arg-type]


@given(TEXT)
def test_quote_round_trips_any_text(value: str) -> None:
    token = quote_value(value)
    assert token.isascii() and token
    assert not any(c in token for c in ' ,"\\\r\n\t;()<>')
    assert unquote_value(token) == value


@given(ADDRESS, st.lists(ADDRESS, min_size=1, max_size=6, unique=True))
def test_envelope_round_trips_through_the_file_format(sender: str, rcpts: list[str]) -> None:
    env = make_envelope(sender, rcpts)
    rec = Record(env.sender, tuple(RecipientStatus(a) for a in env.recipients), 1.5)
    head, data = encode_file(rec, b"Subject: x\r\n\r\nbody\r\n")
    head.decode("ascii")  # the envelope is ASCII whatever the addresses
    back, msg = decode_file(head + data)
    assert (back.sender, back.pending) == (sender, tuple(rcpts))
    assert msg == data
    assert type(msg) is WireData  # the format keeps it in wire form


def test_only_the_own_format_marks_the_message_as_wire_data() -> None:
    _, legacy = decode_file(b"X-Zope-From: a@example.org\nX-Zope-To: b@example.org\n\nbody")
    assert legacy == b"\r\nbody" and type(legacy) is bytes  # normalised again when sent


@given(
    st.lists(
        st.tuples(
            ADDRESS,
            st.sampled_from(["pending", "sent", "failed"]),
            st.one_of(st.none(), st.integers(200, 599)),
            st.one_of(st.none(), TEXT),
        ),
        min_size=1,
        max_size=5,
        unique_by=lambda t: t[0],
    ),
    st.integers(0, 10**6),
    st.one_of(st.none(), TEXT),
)
def test_recipient_states_round_trip(
    rows: list[tuple[str, str, int | None, str | None]], attempts: int, error: str | None
) -> None:
    recipients = tuple(
        RecipientStatus(a, s, c, "" if t is None and c is not None else t) for a, s, c, t in rows
    )
    rec = Record("s@example.org", recipients, 1700000000.25, attempts, "x@y", error)
    head, data = encode_file(rec, b"m\r\n")
    assert decode_file(head + data)[0] == rec


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(ADDRESS, st.lists(ADDRESS, min_size=1, max_size=4, unique=True))
def test_envelope_round_trips_through_a_real_spool(sender: str, rcpts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        sp = Spool(d)
        p = prepare(sender, rcpts, b"Subject: x\r\n\r\nbody\r\n")
        s = sp.stage(p)
        sp.publish([s])
        c = sp.claim(s.id)
        assert c is not None
        assert c.envelope == p.envelope and c.data == p.data
        first, *rest = rcpts
        c.settle(sent=[first], deferred={a: (451, f"try {a}, later") for a in rest}, retry_at=0)
        if rest:
            e = sp.get(s.id)
            assert [r.address for r in e.recipients] == rcpts
            assert [r.text for r in e.recipients[1:]] == [f"try {a}, later" for a in rest]


@given(
    ADDRESS,
    st.lists(ADDRESS, min_size=1, max_size=4, unique=True),
    st.floats(0, 4e9),
    st.binary(max_size=200),
)
def test_the_enqueue_fast_path_writes_what_encode_file_writes(
    sender: str, rcpts: list[str], queued: float, data: bytes
) -> None:
    record = Record(sender, tuple(RecipientStatus(a) for a in rcpts), queued, 0, "m.1@example.org")
    head = encode_head(sender, rcpts, "m.1@example.org", queued, data)
    assert head == encode_file(record, data)[0]
    assert head_size(head + data[:3]) == (len(head), len(data))
    assert head_size(b"Subject: not ours\r\n") is None


@given(st.one_of(ADDRESS, st.sampled_from(["", "-", "a", "x y"])), ADDRESS, st.text(max_size=40))
def test_the_one_recipient_path_quotes_as_encode_file(
    sender: str, rcpt: str, message_id: str
) -> None:
    # One recipient in a tuple (what the delivery passes) is checked in one search.
    record = Record(sender, (RecipientStatus(rcpt),), 7.5, 0, message_id)
    head = encode_head(sender, (rcpt,), message_id, 7.5, b"x\r\n")
    assert head == encode_file(record, b"x\r\n")[0]
