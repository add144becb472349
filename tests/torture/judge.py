"""The verdict of a torture run: pure functions over what was recorded.

Three records meet here, none written by the code under test:

* the writers' journals: a ``C`` event per message whose ``commit()``
  returned (written after it returned), an ``A`` event per message whose
  transaction did not commit, a ``U`` event per message whose COMMIT was
  sent to a database that restarted before answering (committed or not:
  it may be delivered, once, or not at all);
* the relay's journal: an ``accept`` event per message it took (before its
  reply could say so), a ``refuse5`` event per permanent refusal of a
  recipient, a ``fault`` event per fault injected;
* the harness's own notes: when it SIGKILLed which process; and, from the
  processors' logs, each outcome a processor could not write at once
  because the spool was full (it keeps the claim and writes the outcome when
  space comes back), and when it did.

The rules (docs/guarantees.md states them as promises):

* lost: a committed recipient that the relay never took, unless the relay
  refused it permanently *and* the spool has it as failed;
* wrongly failed: a recipient failed in the spool that the relay never
  refused permanently (a message fails only for a reason about itself);
* phantom: a message the relay took although its transaction did not commit;
* duplicate: a recipient taken more than once.  Each copy but the last needs
  a cause in its window: the reply after the final dot was lost (the relay
  dropped or stalled it after taking the message), or the sending processor
  was SIGKILLed between the relay's 250 and the moment its outcome was on
  disk.  That moment is unknown, so the window is: within ``window``
  seconds of the 250 and before the process began the message after the
  next on that connection (a worker settles a message before it sends the
  next one's data; with PIPELINING the next one's MAIL may come with the
  final dot, the one after it only once the message is settled); or,
  when the process logged that the spool was full as it wrote that
  message's outcome, any time until it logged the outcome written; or,
  with a PostgreSQL queue, a restart of the database while one of the
  copies was being sent, or a processor that logged its claim lost with
  its database session (the claim is a lock of that session: the other
  copy may come first);
* a message taken whole: the relay checks each body against its checksum.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DROPPED_REPLY_FAULTS",
    "Duplicate",
    "Kill",
    "Unwritten",
    "Verdict",
    "judge",
    "read_events",
]

#: Relay faults after which the relay had the message but the client had no reply.
DROPPED_REPLY_FAULTS = frozenset({"drop-after-dot-taken", "stall-after-dot-taken"})


@dataclass(frozen=True)
class Kill:
    """A SIGKILL the harness sent: when (``time.monotonic()``), to whom."""

    t: float
    label: str  # a writer incarnation "w0i3" or a processor's EHLO name "p1i4.torture"
    role: str  # "writer" or "processor"


@dataclass(frozen=True)
class Unwritten:
    """An outcome a processor could not write at once: the spool was full
    (or, with a PostgreSQL queue, the database was down)."""

    t: float  # when it said so (monotonic)
    label: str  # the processor's EHLO name
    mid: str  # the Message-Id
    written: float | None = None  # when it said the outcome was written at last
    waited_for: str = "space on the full spool"  # or "the database" (PostgreSQL)


@dataclass(frozen=True)
class Duplicate:
    """A recipient the relay took ``copies`` times, and why each extra copy happened."""

    rcpt: str
    mid: str
    copies: int
    causes: tuple[str, ...]  # one per copy but the last; "" when none was found

    @property
    def explained(self) -> bool:
        """Every extra copy has a cause in its window."""
        return all(self.causes)


@dataclass
class Verdict:
    """Everything the judge counted and every violation it found."""

    committed_messages: int = 0
    committed_recipients: int = 0
    delivered_recipients: int = 0
    delivered_messages: int = 0
    expected_failures: int = 0
    not_committed: int = 0
    #: messages whose COMMIT's answer was lost (the database restarted), and
    #: how many of them were delivered (they had committed after all)
    in_doubt: int = 0
    in_doubt_delivered: int = 0
    unjournaled_deliveries: int = 0
    deliveries: int = 0
    duplicates: list[Duplicate] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    wrongly_failed: list[str] = field(default_factory=list)
    phantoms: list[str] = field(default_factory=list)
    strangers: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def unexplained(self) -> list[Duplicate]:
        """Duplicates with a copy that has no cause in its window."""
        return [d for d in self.duplicates if not d.explained]

    @property
    def problems(self) -> list[str]:
        """One line per violation; empty when the run passed."""
        out: list[str] = []
        out += [f"lost: {x}" for x in self.lost]
        out += [f"failed without a permanent refusal: {x}" for x in self.wrongly_failed]
        out += [f"sent although not committed: {x}" for x in self.phantoms]
        out += [f"delivered, not journaled, writer not killed: {x}" for x in self.strangers]
        out += [f"arrived damaged: {x}" for x in self.damaged]
        out += [f"quarantined: {x}" for x in self.quarantined]
        for d in self.unexplained:
            out.append(f"unexplained duplicate: {d.rcpt} ({d.copies} copies)")
        return out


def read_events(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """JSON lines from ``paths``; a torn last line (a process killed mid-write) is skipped."""
    events: list[dict[str, Any]] = []
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn: the journal line was never completed
                try:
                    events.append(json.loads(raw))
                except ValueError:
                    continue
    return events


def _incarnation(mid: str) -> str:
    return mid.partition("@")[0].partition("n")[0]


def _after(times: Sequence[float] | None, t: float, nth: int = 1) -> float | None:
    """The ``nth`` of ``times`` after ``t`` (None if there are fewer)."""
    later = sorted(x for x in times or () if x > t)
    return later[nth - 1] if len(later) >= nth else None


def _restarted(
    accept: Mapping[str, Any],
    outages: Sequence[tuple[float, float]],
    window: float,
    began: float | None,
) -> str:
    """A database restart that explains the copy ``accept`` ("" when none does).

    The message's claim is a lock of the processor's database session: a
    restart ends it.  A copy is explained when its transaction with the
    relay began before the database was back (``began``, the MAIL) and its
    250 came after, or shortly before, the database went down.
    """
    t = float(accept["t"])
    for down, up in outages:
        if t >= down - window and (began if began is not None else t) <= up:
            return (
                f"the database restarted {down - t:+.3f} s from the relay's 250 "
                f"(down {up - down:.1f} s): the claim ended with its session"
            )
    return ""


def _before(times: Sequence[float] | None, t: float) -> float | None:
    """The last of ``times`` at or before ``t`` (None if none)."""
    earlier = [x for x in times or () if x <= t]
    return max(earlier) if earlier else None


def _cause(
    accept: Mapping[str, Any],
    kills: Sequence[Kill],
    unwritten: Sequence[Unwritten],
    window: float,
    next_mail: float | None,
) -> str:
    """Why the copy ``accept`` was followed by another ("" when nothing explains it).

    ``next_mail`` is when the same connection began the transaction after
    the next (the next one's MAIL may have come with this one's final dot).
    """
    t = float(accept["t"])
    by = accept.get("by")
    fault = accept.get("fault")
    if fault in DROPPED_REPLY_FAULTS:
        what = str(fault).rpartition("-taken")[0]
        return f"the relay took it, then {what}: the reply was lost"
    waiting = [
        u
        for u in unwritten
        if u.label == by and u.mid == accept.get("mid") and t - 0.5 <= u.t <= t + window
    ]
    for k in kills:
        if k.label != by or k.t < t - window:
            continue
        for u in waiting:
            if u.t <= k.t and (u.written is None or k.t < u.written):
                return (
                    f"{k.label} SIGKILLed {k.t - t:+.3f} s after the relay's 250, its "
                    f"outcome still waiting for {u.waited_for}"
                )
        if k.t > t + window or (next_mail is not None and next_mail < k.t):
            continue  # it had settled this message and started the next one
        return f"{k.label} SIGKILLed {k.t - t:+.3f} s from the relay's 250"
    return ""


def judge(
    writer_events: Iterable[Mapping[str, Any]],
    relay_events: Iterable[Mapping[str, Any]],
    *,
    kills: Sequence[Kill],
    unwritten: Sequence[Unwritten] = (),
    failed: Mapping[str, Mapping[str, str]] | None = None,
    left: Mapping[str, Sequence[str]] | None = None,
    quarantined: Sequence[str] = (),
    window: float = 2.0,
    outages: Sequence[tuple[float, float]] = (),
    lost_claims: Mapping[str, str] | None = None,
) -> Verdict:
    """Judge a run.

    Args:
        writer_events: the writers' ``C`` and ``A`` events.
        relay_events: the relay's journal.
        kills: every SIGKILL the harness sent.
        unwritten: each outcome a processor could not write at once because
            the spool was full.
        failed: Message-Id -> {recipient: status} of the spool's failed area.
        left: state -> Message-Ids still in the spool (ready, deferred...).
        quarantined: descriptions of the files in quarantine.
        window: seconds around the relay's 250 in which a kill explains a copy.
        outages: (down, up) times of each restart of a PostgreSQL queue's
            database; a copy sent across one is explained (:func:`_restarted`).
        lost_claims: Message-Id -> the processor that logged its claim lost
            with its database session (it sent, another took the message).

    Returns:
        The :class:`Verdict`.
    """
    v = Verdict()
    failed = failed or {}
    left = left or {}
    committed: dict[str, list[str]] = {}
    aborted: dict[str, str] = {}
    doubtful: set[str] = set()  # COMMIT sent, its answer lost: committed or not
    for e in writer_events:
        if e["e"] == "C":
            committed[e["mid"]] = list(e["rcpts"])
        elif e["e"] == "A":
            aborted[e["mid"]] = str(e.get("why", ""))
        elif e["e"] == "U":
            doubtful.add(e["mid"])
    v.not_committed = len(aborted)
    v.in_doubt = len(doubtful)
    relayed = _read_relay(relay_events, v)
    v.quarantined = list(quarantined)
    where_left = {m: state for state, ms in left.items() for m in ms}
    _check_committed(v, committed, relayed, failed, where_left)
    # Nothing failed that the relay did not refuse for good.
    for mid, statuses in failed.items():
        for r, status in statuses.items():
            if status == "failed" and r not in relayed.refused5:
                v.wrongly_failed.append(f"{mid} -> {r}")
    _check_uncommitted(v, relayed, committed, aborted, kills, doubtful)
    # Every extra copy needs a cause in its window.
    for r, events in sorted(relayed.accepts.items()):
        if len(events) < 2:
            continue
        ordered = sorted(events, key=lambda e: float(e["t"]))
        mails = relayed.mails
        group = _group_cause(ordered, mails, outages, window, (lost_claims or {}).get(
            relayed.mids[r]))  # fmt: skip
        causes = tuple(
            _cause(e, kills, unwritten, window, _after(mails.get(e.get("sess")), e["t"], 2))
            or group
            for e in ordered[:-1]
        )
        v.duplicates.append(Duplicate(r, relayed.mids[r], len(ordered), causes))
    return v


@dataclass
class _Relayed:
    """What the relay's journal says."""

    refused5: set[str] = field(default_factory=set)  # recipients refused for good
    accepts: dict[str, list[Mapping[str, Any]]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )  # recipient -> each acceptance
    mids: dict[str, str] = field(default_factory=dict)  # recipient -> Message-Id
    mails: dict[Any, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )  # session -> MAIL times


def _read_relay(relay_events: Iterable[Mapping[str, Any]], v: Verdict) -> _Relayed:
    """Read the relay's journal; count its faults and deliveries into ``v``."""
    got = _Relayed()
    for e in relay_events:
        kind = e["e"]
        if kind == "fault":
            v.faults[str(e["kind"])] += 1
        elif kind == "mail":
            got.mails[e["sess"]].append(float(e["t"]))
        elif kind == "refuse5":
            got.refused5.add(e["rcpt"])
            if e.get("why") == "bounce":
                v.faults["550-expected-bounce"] += 1
        elif kind == "accept":
            v.deliveries += 1
            mid = e.get("mid")
            if not e.get("intact"):
                v.damaged.append(f"{mid}: body does not match its checksum")
            for r in e["rcpts"]:
                got.accepts[r].append(e)
                got.mids[r] = str(mid)
    return got


def _check_committed(
    v: Verdict,
    committed: Mapping[str, list[str]],
    relayed: _Relayed,
    failed: Mapping[str, Mapping[str, str]],
    where_left: Mapping[str, str],
) -> None:
    """Every committed recipient: delivered, or refused for good and failed."""
    for mid, rcpts in committed.items():
        v.committed_messages += 1
        v.committed_recipients += len(rcpts)
        whole = True
        for r in rcpts:
            if r in relayed.accepts:
                v.delivered_recipients += 1
            elif failed.get(mid, {}).get(r) == "failed":
                if r in relayed.refused5:
                    v.expected_failures += 1
                else:
                    whole = False  # counted as failed without a refusal
            else:
                whole = False
                state = where_left.get(mid)
                if state is not None:
                    why = f"still {state} in the spool"
                elif r in relayed.refused5:
                    why = "refused permanently, but not failed in the spool"
                else:
                    why = "never reached the relay"
                v.lost.append(f"{mid} -> {r}: {why}")
        if whole:
            v.delivered_messages += 1


def _check_uncommitted(
    v: Verdict,
    relayed: _Relayed,
    committed: Mapping[str, list[str]],
    aborted: Mapping[str, str],
    kills: Sequence[Kill],
    doubtful: set[str],
) -> None:
    """What the relay took that was not (known to be) committed."""
    killed_writers = {k.label for k in kills if k.role == "writer"}
    seen: set[str] = set()
    for r in relayed.accepts:
        mid = relayed.mids[r]
        if mid in committed or mid in seen:
            continue
        seen.add(mid)
        if mid in doubtful:
            v.in_doubt_delivered += 1  # it had committed after all
        elif mid in aborted:
            v.phantoms.append(f"{mid} ({aborted[mid]})")
        elif _incarnation(mid) in killed_writers:
            v.unjournaled_deliveries += 1  # killed between commit and its journal line
        else:
            v.strangers.append(mid)


def _group_cause(
    ordered: Sequence[Mapping[str, Any]],
    mails: Mapping[Any, list[float]],
    outages: Sequence[tuple[float, float]],
    window: float,
    lost_by: str | None,
) -> str:
    """A cause for every copy of one recipient: a claim lost with its database
    session explains the copies of its message, whichever came first (the
    other holder's may be the earlier)."""
    for e in ordered:
        why = _restarted(e, outages, window, _before(mails.get(e.get("sess")), e["t"]))
        if why:
            return why
    if lost_by:
        return f"{lost_by} cut off from its claim with its database session"
    return ""
