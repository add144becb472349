"""The judge of the torture run catches what it must: a run that passes proves something.

Hand-written journals, one violation each (or none), through
:func:`tests.torture.judge.judge`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .judge import Kill, Unwritten, judge, read_events

M = "w0i0n1@torture.test"
R0, R1 = "w0i0n1.r0@dest.test", "w0i0n1.r1@dest.test"


def committed(mid: str = M, *rcpts: str) -> dict[str, Any]:
    return {"e": "C", "mid": mid, "rcpts": list(rcpts or (R0,)), "t": 1.0, "crit": 0}


def accept(t: float, *rcpts: str, by: str = "p1i0.torture", fault: str | None = None,
           mid: str = M) -> dict[str, Any]:  # fmt: skip
    return {"e": "accept", "t": t, "mid": mid, "rcpts": list(rcpts or (R0,)), "by": by,
            "fault": fault, "intact": True}  # fmt: skip


def test_a_clean_run_passes() -> None:
    v = judge([committed(M, R0, R1)], [accept(2.0, R0, R1)], kills=[])
    assert v.problems == []
    assert (v.committed_messages, v.delivered_recipients, v.delivered_messages) == (1, 2, 1)


def test_a_committed_recipient_never_delivered_is_lost() -> None:
    v = judge([committed(M, R0, R1)], [accept(2.0, R0)], kills=[])
    assert v.lost == [f"{M} -> {R1}: never reached the relay"]
    assert v.problems


def test_one_still_in_the_spool_is_lost_too() -> None:
    v = judge([committed()], [], kills=[], left={"deferred": [M]})
    assert v.lost == [f"{M} -> {R0}: still deferred in the spool"]


def test_a_failure_needs_a_permanent_refusal_by_the_relay() -> None:
    refusal = {"e": "refuse5", "t": 2.0, "rcpt": R1, "why": "bounce"}
    ok = judge([committed(M, R0, R1)], [accept(2.0, R0), refusal], kills=[],
               failed={M: {R0: "sent", R1: "failed"}})  # fmt: skip
    assert ok.problems == [] and ok.expected_failures == 1
    bad = judge([committed(M, R0, R1)], [accept(2.0, R0)], kills=[],
                failed={M: {R0: "sent", R1: "failed"}})  # fmt: skip
    assert bad.wrongly_failed == [f"{M} -> {R1}"]
    refused_not_failed = judge([committed(M, R0, R1)], [accept(2.0, R0), refusal], kills=[])
    assert refused_not_failed.lost == [
        f"{M} -> {R1}: refused permanently, but not failed in the spool"
    ]


def test_a_duplicate_needs_a_kill_in_its_window() -> None:
    events = [accept(10.0, by="p1i0.torture"), accept(11.0, by="p0i1.torture")]
    near = judge([committed()], events, kills=[Kill(10.05, "p1i0.torture", "processor")])
    assert near.problems == []
    assert "SIGKILLed +0.050 s" in near.duplicates[0].causes[0]
    far = judge([committed()], events, kills=[Kill(15.0, "p1i0.torture", "processor")])
    assert [d.rcpt for d in far.unexplained] == [R0]
    other = judge([committed()], events, kills=[Kill(10.05, "p0i1.torture", "processor")])
    assert other.unexplained  # the kill of another process explains nothing


def test_a_kill_after_the_sender_moved_on_explains_nothing() -> None:
    first = dict(accept(10.0, by="p1i0.torture"), sess=7)
    mails = [{"e": "mail", "t": 10.01, "sess": 7}, {"e": "mail", "t": 10.02, "sess": 7}]
    events = [first, *mails, accept(11.0, by="p0i1.torture")]
    kill = [Kill(10.05, "p1i0.torture", "processor")]
    # It began the message after the next on that connection before it
    # died: it had settled this one, so the kill is not why it came again.
    assert judge([committed()], events, kills=kill).unexplained
    # One MAIL proves nothing: with PIPELINING it came with the final dot.
    events[2] = {"e": "mail", "t": 10.09, "sess": 7}  # the second MAIL after the kill
    assert judge([committed()], events, kills=kill).problems == []


def test_a_lost_reply_after_the_final_dot_explains_a_duplicate() -> None:
    events = [accept(10.0, fault="drop-after-dot-taken"), accept(11.0)]
    assert judge([committed()], events, kills=[]).problems == []
    after_250 = [accept(10.0, fault="drop-after-250"), accept(11.0)]
    assert judge([committed()], after_250, kills=[]).unexplained  # the client had its 250


def test_a_kill_while_the_outcome_waits_for_space_explains_a_copy() -> None:
    events = [accept(10.0), accept(20.0)]
    kill = [Kill(15.0, "p1i0.torture", "processor")]  # long after the 250
    assert judge([committed()], events, kills=kill).unexplained  # outside the 2 s window
    waiting = Unwritten(10.01, "p1i0.torture", M)  # "the spool cannot record this outcome"
    v = judge([committed()], events, kills=kill, unwritten=[waiting])
    assert v.problems == []
    assert "still waiting for space" in v.duplicates[0].causes[0]
    # Written before the kill: the message was settled, the kill explains nothing.
    written = Unwritten(10.01, "p1i0.torture", M, written=12.0)
    assert judge([committed()], events, kills=kill, unwritten=[written]).unexplained
    # A full spool without a kill explains nothing either: the claim was kept.
    assert judge([committed()], events, kills=[], unwritten=[waiting]).unexplained


def test_a_recipient_failed_by_a_data_refusal_it_was_not_in_is_wrongly_failed() -> None:
    refusal = {"e": "refuse5", "t": 2.0, "rcpt": R0, "mid": M, "why": "554-after-dot"}
    failed = {M: {R0: "failed", R1: "failed"}}
    v = judge([committed(M, R0, R1)], [refusal], kills=[], failed=failed)
    assert v.expected_failures == 1 and v.wrongly_failed == [f"{M} -> {R1}"]


def test_mail_of_a_transaction_that_did_not_commit_must_never_be_sent() -> None:
    aborted = {"e": "A", "mid": M, "why": "rolled back to a savepoint"}
    v = judge([aborted], [accept(2.0)], kills=[])
    assert v.phantoms == [f"{M} (rolled back to a savepoint)"]


def test_delivered_without_a_journal_line_only_if_the_writer_was_killed() -> None:
    ok = judge([], [accept(2.0)], kills=[Kill(1.5, "w0i0", "writer")])
    assert ok.problems == [] and ok.unjournaled_deliveries == 1
    bad = judge([], [accept(2.0)], kills=[Kill(1.5, "w0i1", "writer")])
    assert bad.strangers == [M]


def test_a_damaged_body_and_a_quarantined_file_are_problems() -> None:
    damaged = dict(accept(2.0), intact=False)
    assert judge([committed()], [damaged], kills=[]).damaged
    assert judge([committed()], [accept(2.0)], kills=[], quarantined=["x: bad"]).problems


def test_a_torn_last_journal_line_is_not_a_commit(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(b'{"e": "C", "mid": "a"}\n{"e": "C", "mid": "b"')
    assert [e["mid"] for e in read_events([path])] == ["a"]


def test_a_database_restart_explains_a_copy_sent_across_it_and_nothing_else() -> None:
    def mail(t: float, sess: int) -> dict[str, Any]:
        return {"e": "mail", "t": t, "sess": sess}

    across = [mail(9.5, 1), {**accept(11.0, by="p1i0.torture"), "sess": 1},
              mail(12.0, 2), {**accept(12.1, by="p2i0.torture"), "sess": 2}]  # fmt: skip
    v = judge([committed()], across, kills=[], outages=[(10.0, 10.5)])
    assert v.problems == [] and "database restarted" in v.duplicates[0].causes[0]
    # The later copy began before the database was back: it explains the earlier.
    late = [mail(11.5, 2), {**accept(11.6, by="p2i0.torture"), "sess": 2},
            mail(9.9, 1), {**accept(12.0, by="p1i0.torture"), "sess": 1}]  # fmt: skip
    assert judge([committed()], late, kills=[], outages=[(10.0, 10.5)]).problems == []
    long_after = [mail(30.0, 1), {**accept(30.1), "sess": 1},
                  mail(31.0, 2), {**accept(31.1, by="p2i0.torture"), "sess": 2}]  # fmt: skip
    assert judge([committed()], long_after, kills=[], outages=[(10.0, 10.5)]).unexplained
    lost = judge([committed()], long_after, kills=[], lost_claims={M: "p1i0.torture"})
    assert lost.problems == [] and "cut off from its claim" in lost.duplicates[0].causes[0]


def test_a_commit_in_doubt_may_be_delivered_once_or_not_at_all() -> None:
    doubt = {"e": "U", "mid": M, "why": "commit raised OperationalError"}
    sent = judge([doubt], [accept(2.0)], kills=[])
    assert sent.problems == [] and (sent.in_doubt, sent.in_doubt_delivered) == (1, 1)
    unsent = judge([doubt], [], kills=[])
    assert unsent.problems == [] and unsent.lost == []
