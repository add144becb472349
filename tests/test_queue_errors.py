"""What every queue backend raises when an operation cannot be done.

Maildir, memory and PostgreSQL (a real server, see ``_pg.py``) are held to
the same errors: a message that is not there is :class:`NoSuchMessage`
(still a ``KeyError``), a move its state does not allow is
:class:`MessageStateError`; neither is an ``OSError``, and neither is worth
retrying.  Only a queue that cannot be read or written is an ``OSError``
(:class:`SpoolIOError`).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _pg import pg_database, pg_url, queue  # noqa: F401
from mailspool.errors import (
    MessageStateError,
    NoSuchMessage,
    SpoolError,
    SpoolIOError,
    is_transient,
)
from mailspool.maildir.spool import Spool
from mailspool.memory import MemoryQueue
from mailspool.message import prepare

A = "a@example.org"


@pytest.fixture(params=["maildir", "memory", "postgres"])
def q(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "maildir":
        yield Spool(tmp_path / "spool")
    elif request.param == "memory":
        yield MemoryQueue()
    else:
        yield request.getfixturevalue("queue")


def put(q: Any) -> str:
    staged = q.stage(prepare("s@example.org", [A], b"Subject: x\r\n\r\nhi\r\n"))
    q.publish([staged])
    return str(staged.id)


def gone(q: Any) -> str:
    """The id of a message that was in the queue and is not any more."""
    id = put(q)
    q.delete(id)
    return id


def _is_logic_error(exc: BaseException) -> None:
    assert isinstance(exc, SpoolError) and not isinstance(exc, OSError)
    assert not is_transient(exc)


@pytest.mark.parametrize("verb", ["get", "message", "retry", "hold", "release", "delete"])
def test_no_such_message(q: Any, verb: str) -> None:
    id = gone(q)
    with pytest.raises(NoSuchMessage) as info:
        getattr(q, verb)(id)
    assert info.value.id == id and str(info.value) == f"no such message: {id}"
    assert isinstance(info.value, KeyError)  # callers' `except KeyError` still works
    _is_logic_error(info.value)


def test_a_move_the_state_does_not_allow(q: Any) -> None:
    id = put(q)  # ready
    with pytest.raises(MessageStateError, match=r"not held \(it is ready\): nothing to release"):
        q.release(id)
    with pytest.raises(MessageStateError, match="cannot retry a message that is ready") as info:
        q.retry(id)
    _is_logic_error(info.value)
    assert q.state(id) == "ready"  # nothing moved


def test_a_claim_settled_twice(q: Any) -> None:
    id = put(q)
    claim = q.claim(id)
    assert claim is not None
    claim.settle(sent=[A])
    for again in (lambda: claim.settle(sent=[A]), lambda: claim.defer(0.0, "later")):
        with pytest.raises(MessageStateError, match=f"cannot .* {id}: already") as info:
            again()
        _is_logic_error(info.value)


def test_a_spool_that_cannot_be_opened_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(SpoolIOError) as info:
        Spool(tmp_path / "missing", create=False)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOENT
    assert isinstance(info.value, SpoolError) and is_transient(info.value)
