"""The torture run's harness and command line.

Usage, from the repository root (as root for the tmpfs and the power cut)::

    python -m tests.torture.run                      # about a minute
    python -m tests.torture.run --rounds 200 --seconds 180 --power-cuts 10
    python tests/torture/run.py --seed 7 --keep      # a script path works too

Phases:

1. *Chaos.*  A faulty relay (:mod:`.relay`), writer processes and processor
   processes (one runs ``mailspool run``, the others a ``QueueProcessor``)
   work on one spool; the spool is on a small tmpfs that a filler thread
   fills up now and then.  ``--rounds`` times, at random moments spread over
   ``--seconds``, a writer, a processor, or all of them at once are
   SIGKILLed and started again.
2. *Drain.*  The relay turns calm (only the recipients it always refuses are
   refused), the disk is freed, the writers stop; the processors must empty
   the spool.  Then they are stopped with SIGTERM.
3. *Verdict* (:mod:`.judge`) over the writers' and the relay's journals.
4. *Power loss* (:mod:`.powerloss`), ``--power-cuts`` times.

The report is printed; the exit status is 0 when every criterion held, 1
otherwise.  docs/guarantees.md describes what the run proves.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script path: make the package importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parents[2]))
    __package__ = "tests.torture"

import argparse
import collections
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailspool.maildir.spool import Spool
from mailspool.queue import QueueBackend

from .actors import READY, cli_processor_argv
from .judge import Kill, Unwritten, Verdict, judge, read_events
from .pgserver import Cluster
from .pgserver import unavailable as unavailable_pg
from .powerloss import CutResult, power_cut, unavailable

__all__ = ["Options", "Report", "main", "torture"]

_PACKAGE = __package__ or "tests.torture"
_IMPORT_ROOT = str(Path(__file__).resolve().parents[len(_PACKAGE.split("."))])


@dataclass(frozen=True)
class Options:
    """How hard and how long to torture.

    Attributes:
        rounds: kill rounds in the chaos phase.
        seconds: how long the chaos phase lasts (the rounds are spread over it).
        seed: seeds every random choice (the relay's, the writers', the kills').
        writers: writer processes.
        processors: processor processes; the first runs ``mailspool run``.
        power_cuts: simulated power losses after the chaos (0: none).
        tmpfs: put the spool on a tmpfs of this size and fill it now and
            then (``""``: a plain directory, no full disk).
        fault_rate: multiplies the relay's fault probabilities.
        pace: mean seconds a writer waits between transactions.
        drain_timeout: seconds the processors get to empty the spool at the end.
        workdir: where everything goes (default: a new temporary directory).
        keep: keep the working directory even when the run passed.
        backend: ``"maildir"``, or ``"postgres"``: the queue is a PostgreSQL
            database of a private server (:mod:`.pgserver`); the writers
            commit in their own transactions (the outbox), there is no full
            disk and no power cut, and the server is restarted
            ``db_restarts`` times during the chaos.
        db_restarts: restarts of the PostgreSQL server in the chaos phase.
    """

    rounds: int = 30
    seconds: float = 20.0
    seed: int = 1
    writers: int = 2
    processors: int = 2
    power_cuts: int = 2
    tmpfs: str = "64m"
    fault_rate: float = 1.0
    pace: float = 0.03
    drain_timeout: float = 40.0
    workdir: str | None = None
    keep: bool = False
    backend: str = "maildir"
    db_restarts: int = 0


@dataclass
class Report:
    """The outcome of a run: the verdict, the harness's counts, the power cuts."""

    options: Options
    verdict: Verdict | None = None
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    self_exits: list[str] = field(default_factory=list)
    stop_failures: list[str] = field(default_factory=list)
    full_periods: list[tuple[float, float]] = field(default_factory=list)
    chaos_seconds: float = 0.0
    drain_seconds: float = 0.0
    transactions: int = 0
    refused_full: int = 0
    internal_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    tmpfs_note: str = ""
    power_note: str = ""
    cuts: list[CutResult] = field(default_factory=list)
    workdir: str = ""
    #: (down, up) of each database restart, monotonic
    restarts: list[tuple[float, float]] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = list(self.verdict.problems) if self.verdict else ["no verdict"]
        out += [f"stopped by itself: {x}" for x in self.self_exits]
        out += [f"did not stop cleanly: {x}" for x in self.stop_failures]
        for cut in self.cuts:
            out += cut.problems
        return out

    @property
    def passed(self) -> bool:
        return not self.problems

    def _duplicates(self, v: Verdict) -> list[str]:
        """Each duplicate with its cause; grouped by cause when there are many."""
        copies = [(d.rcpt, cause) for d in v.duplicates for cause in d.causes]
        if len(copies) <= 40:
            return [f"      {rcpt}: {cause or 'NO CAUSE FOUND'}" for rcpt, cause in copies]
        groups = collections.Counter(
            _SECONDS.sub(_when, _LABEL.sub("the sender was", cause)) or "NO CAUSE"
            for _, cause in copies
        )
        out = [f"      {n:5d} x {what}" for what, n in groups.most_common()]
        out += [
            f"      {rcpt}: {cause or 'NO CAUSE FOUND'}"
            for rcpt, cause in copies
            if not cause or "SIGKILL" in cause
        ]
        if self.workdir:
            out.append(f"      (every copy: {self.workdir}/duplicates.txt)")
        return out

    def text(self) -> str:
        """The report, as printed."""
        o = self.options
        v = self.verdict or Verdict()
        full_total = sum(b - a for a, b in self.full_periods)
        lines = [
            f"mailspool torture run: seed {o.seed}, {o.rounds} kill rounds in "
            f"{self.chaos_seconds:.1f} s, {o.writers} writers, {o.processors} processors "
            "(the first one `mailspool run`)",
        ]
        if o.backend == "postgres":
            down = sum(b - a for a, b in self.restarts)
            lines.append(
                f"  database:      PostgreSQL queue, server restarted {len(self.restarts)} "
                f"times ({down:.1f} s down); commits in doubt (answer lost): {v.in_doubt}, "
                f"{v.in_doubt_delivered} of them delivered"
            )
        if self.tmpfs_note:
            lines.append(f"  full disk:     {self.tmpfs_note}")
        else:
            lines.append(
                f"  full disk:     spool on a {o.tmpfs} tmpfs, full {len(self.full_periods)} "
                f"times ({full_total:.1f} s, "
                f"{100 * full_total / max(self.chaos_seconds, 1e-9):.0f} % of the chaos)"
            )
        lines += [
            f"  committed:     {v.committed_messages} messages to {v.committed_recipients} "
            f"recipients in {self.transactions} transactions",
            f"  not committed: {v.not_committed} messages (aborted, rolled back, vetoed, or "
            f"refused at commit: {self.refused_full} of them for a full disk); sent: "
            f"{len(v.phantoms)}",
            f"  delivered:     {v.delivered_recipients} recipients; {v.delivered_messages} "
            f"messages complete; {v.deliveries} deliveries seen by the relay",
            f"  failed:        {v.expected_failures} recipients, each refused permanently "
            f"by the relay; failed without such a refusal: {len(v.wrongly_failed)}",
            f"  duplicated:    {len(v.duplicates)} recipients, "
            f"{len(v.unexplained)} without a cause in their window",
        ]
        lines += self._duplicates(v)
        lines += [
            f"  lost:          {len(v.lost)}",
            f"  quarantined:   {len(v.quarantined)}",
            f"  damaged:       {len(v.damaged)}",
            f"  unjournaled:   {v.unjournaled_deliveries} messages delivered whose writer was "
            "killed after commit() returned, before its journal line",
            "  kills:         "
            + ", ".join(f"{k} {n}" for k, n in sorted(self.kills.items()))
            + f"; processes that stopped by themselves: {len(self.self_exits)}",
            "  faults:        "
            + ", ".join(f"{k} {n}" for k, n in sorted(v.faults.items()))
            + f", full disk {len(self.full_periods)}",
        ]
        if self.internal_errors:
            lines.append(
                "  logged:        "
                + "; ".join(f"{n}x {k}" for k, n in self.internal_errors.most_common(6))
            )
        if self.power_note:
            lines.append(f"  power loss:    {self.power_note}")
        elif self.cuts:
            c = self.cuts
            lines.append(
                f"  power loss:    {len(c)} cuts; commit() returned before the cut: "
                f"{sum(x.committed_before for x in c)}, present and whole after remount: "
                f"{sum(x.present for x in c)}, missing {sum(len(x.missing) for x in c)}, "
                f"damaged {sum(len(x.damaged) for x in c)}"
            )
            lines.append(
                f"                 returned after the cut: {sum(x.after_cut for x in c)} "
                f"(present {sum(x.after_cut_present for x in c)}); returned although "
                f"mailspool logged CRITICAL: {sum(len(x.finish_failed) for x in c)}; "
                f"commits that raised: {sum(x.refused for x in c)}"
            )
        problems = self.problems
        lines.append("verdict: " + ("PASS" if not problems else f"FAIL ({len(problems)})"))
        lines += [f"  - {p}" for p in problems[:50]]
        if self.workdir:
            lines.append(f"work directory: {self.workdir}")
        return "\n".join(lines)


_MID_IN_LOG = re.compile(r" <([^<>@\s]+@[^<>\s]+)> ")
_SECONDS = re.compile(r" [+-]\d+\.\d+ s (from|after)")
_LABEL = re.compile(r"^p\d+i\d+\.torture")


def _when(m: re.Match[str]) -> str:
    return " at" if m.group(1) == "from" else " after"


_NOISE = re.compile(r"\S*\d\S*|<[^>]*>|\S*@\S*")
_LOG_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _log_records(path: Path) -> Iterator[list[str]]:
    """The log records of a file: a timestamped line and its continuation lines."""
    record: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if _LOG_START.match(line):
            if record:
                yield record
            record = [line]
        elif record:
            record.append(line)
    if record:
        yield record


#: Seconds a processor child is given to start before a SIGTERM (it cannot say when it is ready).
START_GRACE = 3.0


@dataclass
class _Child:
    role: str
    slot: int
    incarnation: int
    label: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    def ready(self) -> bool:
        """Whether it has its SIGTERM handler: a writer says so in its log
        (:data:`READY`); a processor is given :data:`START_GRACE` seconds."""
        if self.role == "writer":
            try:
                return READY in self.log.read_bytes()
            except OSError:
                return False
        return time.monotonic() - self.started >= START_GRACE


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_IMPORT_ROOT, env.get("PYTHONPATH")]))
    return env


def _module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"{_PACKAGE}.{name}", *args]


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[str | None]:
    """Mount a tmpfs on ``path``; yield None, or why it could not be done."""
    path.mkdir(parents=True, exist_ok=True)
    if not size:
        yield "not asked for (--tmpfs '')"
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        yield "skipped: mounting a tmpfs needs root; the spool is a plain directory"
        return
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        yield f"skipped: cannot mount a tmpfs ({proc.stderr.strip()}); plain directory"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class _Harness:
    def __init__(self, opts: Options, workdir: Path, report: Report) -> None:
        self.o = opts
        self.work = workdir
        self.report = report
        self.rng = random.Random(opts.seed)
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.journals = workdir / "journals"
        self.journals.mkdir(exist_ok=True)
        self.kills: list[Kill] = []
        self.children: list[_Child] = []
        self.incarnations: collections.Counter[str] = collections.Counter()
        self.relay: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.spool = ""
        self.fs: Path | None = None
        self.stop_filling = threading.Event()
        self.cluster: Cluster | None = None  # the PostgreSQL server (backend postgres)
        #: Message-Id -> the processor that logged its claim lost (PostgreSQL)
        self.lost_claims: dict[str, str] = {}

    def queue(self) -> QueueBackend:
        """The queue under test, opened anew (a spool, or the database's queue)."""
        if self.cluster is not None:
            from mailspool.postgres import PostgresQueue

            return PostgresQueue(self.spool)
        return Spool(self.spool)

    # -- processes ----------------------------------------------------------------

    def start_relay(self) -> None:
        argv = _module(
            "relay",
            "--journal",
            str(self.work / "relay.jsonl"),
            "--seed",
            str(self.o.seed),
            "--fault-rate",
            str(self.o.fault_rate),
        )
        with open(self.logs / "relay.log", "wb") as err:
            self.relay = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err, env=_env(), start_new_session=True
            )
        assert self.relay.stdout is not None
        line = self.relay.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the relay did not start: {(self.logs / 'relay.log').read_text()}")
        self.port = int(line)

    def spawn(self, role: str, slot: int) -> _Child:
        key = f"{role}{slot}"
        inc = self.incarnations[key]
        self.incarnations[key] += 1
        if role == "writer":
            label = f"w{slot}i{inc}"
            argv = _module(
                "actors",
                "writer",
                "--spool",
                self.spool,
                "--journal",
                str(self.journals / f"{label}.jsonl"),
                "--slot",
                str(slot),
                "--incarnation",
                str(inc),
                "--seed",
                str(self.rng.getrandbits(32)),
                "--pace",
                str(self.o.pace),
            )
        else:
            label = f"p{slot}i{inc}.torture"
            if slot == 0:
                argv = cli_processor_argv(self.spool, self.port, label)
            else:
                argv = _module(
                    "actors",
                    "processor",
                    "--spool",
                    self.spool,
                    "--port",
                    str(self.port),
                    "--label",
                    label,
                )
        log = self.logs / f"{label}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
            )
        child = _Child(role, slot, inc, label, proc, log)
        self.children.append(child)
        return child

    def live(self, role: str | None = None) -> list[_Child]:
        return [c for c in self.children if c.proc.returncode is None and role in (None, c.role)]

    def kill(self, victims: Sequence[_Child]) -> None:
        t = time.monotonic()
        for c in victims:
            c.proc.send_signal(signal.SIGKILL)
        for c in victims:
            c.proc.wait()
            self.kills.append(Kill(t, c.label, c.role))
            self.report.kills[c.role + "s"] += 1
            if c.role == "processor" and c.slot == 0:
                self.report.kills["of which `mailspool run`"] += 1
        if len(victims) > 1:
            self.report.kills["rounds that killed everything"] += 1
        for c in victims:
            self.spawn(c.role, c.slot)

    def check(self) -> None:
        """A child that ended without being killed is a finding; start another."""
        for c in self.live():
            rc = c.proc.poll()
            if rc is None:
                continue
            tail = c.log.read_text(errors="replace")[-600:].strip().replace("\n", " | ")
            self.report.self_exits.append(f"{c.role} {c.label} exited with {rc}: {tail}")
            self.spawn(c.role, c.slot)

    def stop(self, role: str, timeout: float) -> None:
        """SIGTERM every live child of ``role``; each must exit 0 in time.

        A child spawned just before (by the last kill round) may still be
        starting, without its SIGTERM handler: it is given until it is
        ready, within ``timeout``, since a stop is a promise of a running
        process, not of one that is still importing its modules.
        """
        victims = self.live(role)
        deadline = time.monotonic() + timeout
        for c in victims:
            while not c.ready() and c.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        for c in victims:
            c.proc.send_signal(signal.SIGTERM)
        for c in victims:
            try:
                rc = c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
                self.report.stop_failures.append(
                    f"{c.label}: still running {timeout:g} s after SIGTERM"
                )
                continue
            if rc != 0:
                self.report.stop_failures.append(f"{c.label}: exit status {rc} after SIGTERM")

    def kill_everything(self) -> None:
        for c in self.live():
            c.proc.kill()
            c.proc.wait()
        if self.relay is not None and self.relay.poll() is None:
            self.relay.kill()
            self.relay.wait()

    # -- the full disk ----------------------------------------------------------------

    def filler(self) -> None:
        assert self.fs is not None
        rng = random.Random(self.o.seed + 1)
        path = self.fs / "filler"
        block = b"\0" * 65536
        while not self.stop_filling.wait(rng.uniform(1.0, 3.0)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                with contextlib.suppress(OSError):
                    while os.write(fd, block):
                        pass
                start = time.monotonic()
                self.stop_filling.wait(rng.uniform(0.2, 0.8))
            finally:
                os.close(fd)
                os.unlink(path)
            self.report.full_periods.append((start, time.monotonic()))

    def restarter(self) -> None:
        """Restart the database ``db_restarts`` times, spread over the chaos."""
        assert self.cluster is not None
        rng = random.Random(self.o.seed + 2)
        start = time.monotonic()
        moments = sorted(rng.uniform(1.0, self.o.seconds - 1.0) for _ in range(self.o.db_restarts))
        for i, moment in enumerate(moments):
            if self.stop_filling.wait(max(0.0, start + moment - time.monotonic())):
                return
            down = time.monotonic()
            self.cluster.stop("immediate" if i % 2 else "fast")  # a crash, every other time
            self.stop_filling.wait(rng.uniform(0.2, 1.5))  # down a while
            self.cluster.start()
            self.report.restarts.append((down, time.monotonic()))

    # -- phases ------------------------------------------------------------------------

    def chaos(self) -> None:
        o = self.o
        for slot in range(o.writers):
            self.spawn("writer", slot)
        for slot in range(o.processors):
            self.spawn("processor", slot)
        filler = None
        if self.fs is not None:
            filler = threading.Thread(target=self.filler, name="filler", daemon=True)
            filler.start()
        elif self.cluster is not None and o.db_restarts:
            filler = threading.Thread(target=self.restarter, name="restarter", daemon=True)
            filler.start()
        start = time.monotonic()
        moments = sorted(self.rng.uniform(0.3, o.seconds) for _ in range(o.rounds))
        for moment in moments:
            while time.monotonic() < start + moment:
                self.check()
                time.sleep(min(0.05, max(0.0, start + moment - time.monotonic())))
            self.check()
            x = self.rng.random()
            if x < 0.08:
                victims = self.live("writer") + self.live("processor")  # a crash of everything
            elif x < 0.55:
                victims = [self.rng.choice(self.live("processor"))]
            else:
                victims = [self.rng.choice(self.live("writer"))]
            self.kill(victims)
        while time.monotonic() < start + o.seconds:
            self.check()
            time.sleep(0.05)
        self.stop_filling.set()
        if filler is not None:
            filler.join()
        self.report.chaos_seconds = time.monotonic() - start

    def drain(self) -> None:
        assert self.relay is not None
        self.relay.send_signal(signal.SIGUSR1)  # calm: only the bounce recipients are refused
        self.stop("writer", 30.0)
        start = time.monotonic()
        spool = self.queue()
        while time.monotonic() < start + self.o.drain_timeout:
            self.check()
            c = spool.counts()
            if c["ready"] + c["in_flight"] + c["deferred"] == 0:
                break
            time.sleep(0.1)
        self.report.drain_seconds = time.monotonic() - start
        close = getattr(spool, "close", None)
        if close is not None:
            close()
        self.stop("processor", 20.0)
        self.relay.send_signal(signal.SIGTERM)
        self.relay.wait(20)

    def save_notes(self) -> None:
        """The harness's own records, for a post-mortem: kills and full periods."""
        notes = {
            "monotonic_to_wall": time.time() - time.monotonic(),
            "kills": [vars(k) for k in self.kills],
            "full_periods": self.report.full_periods,
            "restarts": self.report.restarts,
        }
        (self.work / "harness.json").write_text(json.dumps(notes, indent=1))

    def unwritten(self) -> list[Unwritten]:
        """From the processors' logs: outcomes that waited for space on a full spool
        (or for the database of a PostgreSQL queue).

        Also counts the unexpected errors they logged, for the report.
        """
        waiting: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        written: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        offset = time.time() - time.monotonic()
        waited_for = "the database" if self.cluster is not None else "space on the full spool"
        for c in self.children:
            if c.role != "processor":
                continue
            for record in _log_records(c.log):
                first = record[0]
                m = _MID_IN_LOG.search(first)
                wall = time.mktime(time.strptime(first[:19], "%Y-%m-%d %H:%M:%S"))
                t = wall + int(first[20:23]) / 1000 - offset
                if m is not None and "cannot record this outcome" in first:
                    waiting[(c.label, m.group(1))].append(t)
                    self.report.internal_errors[f"outcome waited for {waited_for}"] += 1
                elif m is not None and "this outcome is not recorded" in first:
                    self.lost_claims[m.group(1)] = c.label
                elif m is not None and "written to the spool now, after" in first:
                    written[(c.label, m.group(1))].append(t)
                elif " ERROR " in first and "unexpected" in first:
                    key = " ".join(_NOISE.sub("", first.split(": ", 1)[-1]).split())[:100]
                    self.report.internal_errors[key] += 1
        out = []
        for (label, mid), times in waiting.items():
            for t in times:
                later = [w for w in written.get((label, mid), ()) if w >= t]
                out.append(Unwritten(t, label, mid, min(later) if later else None, waited_for))
        return out

    def verdict(self) -> Verdict:
        self.save_notes()
        spool = self.queue()
        failed: dict[str, dict[str, str]] = {}
        for e in spool.entries("failed"):
            failed[e.message_id or e.id] = {r.address: r.status for r in e.recipients}
        left: dict[str, list[str]] = {}
        for state in ("ready", "in_flight", "deferred", "held"):
            left[state] = [e.message_id or e.id for e in spool.entries(state)]
        quarantined = [f"{e.id}: {e.last_error}" for e in spool.entries("quarantined")]
        writer_events = read_events(sorted(self.journals.glob("*.jsonl")))
        self.report.transactions = len(
            {(e["mid"].partition("n")[0], e["t"]) for e in writer_events if e["e"] == "C"}
        )
        self.report.refused_full = sum(
            1 for e in writer_events if e["e"] == "A" and e.get("errno") == errno.ENOSPC
        )
        verdict = judge(
            writer_events,
            read_events([self.work / "relay.jsonl"]),
            kills=self.kills,
            unwritten=self.unwritten(),
            failed=failed,
            left=left,
            quarantined=quarantined,
            outages=self.report.restarts,
            lost_claims=self.lost_claims,
        )
        close = getattr(spool, "close", None)
        if close is not None:
            close()
        with open(self.work / "duplicates.txt", "w", encoding="utf-8") as f:
            for d in verdict.duplicates:
                for cause in d.causes:
                    f.write(f"{d.rcpt} ({d.mid}): {cause or 'NO CAUSE FOUND'}\n")
        return verdict

    def power(self) -> None:
        why = unavailable()
        if why is not None:
            self.report.power_note = f"skipped: {why}"
            return

        def writer(spool: str, journal: str, slot: int) -> subprocess.Popen[bytes]:
            argv = _module(
                "actors",
                "writer",
                "--power",
                "--pace",
                "0",
                "--spool",
                spool,
                "--journal",
                journal,
                "--slot",
                str(slot),
                "--incarnation",
                "0",
                "--seed",
                str(self.rng.getrandbits(32)),
            )
            with open(self.logs / f"power-{Path(journal).stem}.log", "ab") as out:
                return subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
                )

        for i in range(self.o.power_cuts):
            try:
                self.report.cuts.append(power_cut(self.work, i, rng=self.rng, spawn_writer=writer))
            except RuntimeError as exc:
                self.report.power_note = f"skipped: {exc}"
                return


def torture(opts: Options) -> Report:
    """Run the whole torture; return its report (``report.passed``, ``report.text()``)."""
    made = opts.workdir is None
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="mailspool-torture-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report(opts, workdir=str(workdir))
    h = _Harness(opts, workdir, report)
    if opts.backend == "postgres":
        return _torture_postgres(opts, workdir, report, h, made)
    fs = workdir / "fs"
    try:
        with _tmpfs(fs, opts.tmpfs) as why:
            if why is None:
                h.fs = fs
            else:
                report.tmpfs_note = why
            h.spool = str(fs / "spool")
            Spool(h.spool)
            h.start_relay()
            try:
                h.chaos()
                h.drain()
            finally:
                h.kill_everything()
            report.verdict = h.verdict()
            if not report.passed:
                with contextlib.suppress(OSError):
                    shutil.copytree(h.spool, workdir / "spool-at-the-end", symlinks=True)
        if opts.power_cuts:
            h.power()
    finally:
        h.kill_everything()
    if report.passed and made and not opts.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        report.workdir = ""
    return report


def _torture_postgres(
    opts: Options, workdir: Path, report: Report, h: _Harness, made: bool
) -> Report:
    """The run with a PostgreSQL queue on a private server, restarted now and then."""
    from mailspool.postgres import PostgresQueue

    why = unavailable_pg()
    if why is not None:
        raise RuntimeError(f"no PostgreSQL server for the torture run: {why}")
    report.tmpfs_note = "none with a PostgreSQL queue"
    report.power_note = "none with a PostgreSQL queue (the database's own durability)"
    h.cluster = Cluster.make(workdir / "pg")
    try:
        h.cluster.start()
        h.spool = f"{h.cluster.url}?schema=torture"
        PostgresQueue(h.spool, create=True).close()
        h.start_relay()
        try:
            h.chaos()
            h.drain()
        finally:
            h.kill_everything()
        report.verdict = h.verdict()
    finally:
        h.kill_everything()
        if not report.passed:
            with contextlib.suppress(OSError):
                shutil.copy(h.cluster.log, workdir / "postgres.log")
        h.cluster.remove()
    if report.passed and made and not opts.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        report.workdir = ""
    return report


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m tests.torture.run",
        description="Torture mailspool end to end and judge the result (docs/guarantees.md).",
    )
    p.add_argument("--rounds", type=int, default=d.rounds, help="kill rounds (%(default)s)")
    p.add_argument(
        "--seconds", type=float, default=d.seconds, help="length of the chaos phase (%(default)s)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (%(default)s)")
    p.add_argument("--writers", type=int, default=d.writers)
    p.add_argument("--processors", type=int, default=None, help="(2; 4 with --backend postgres)")
    p.add_argument(
        "--power-cuts", type=int, default=d.power_cuts, help="ext4 power cuts (%(default)s)"
    )
    p.add_argument("--tmpfs", default=d.tmpfs, help="tmpfs size for the spool; '' for none")
    p.add_argument("--fault-rate", type=float, default=d.fault_rate)
    p.add_argument("--pace", type=float, default=d.pace, help="mean pause between transactions")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--workdir", default=None, help="keep everything here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--backend",
        choices=("maildir", "postgres"),
        default=d.backend,
        help="the queue: a Maildir spool, or PostgreSQL on a private server (%(default)s)",
    )
    p.add_argument(
        "--db-restarts",
        type=int,
        default=None,
        help="PostgreSQL server restarts during the chaos (postgres: default 4)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run from the command line; print the report; 0 when the run passed."""
    a = build_parser().parse_args(argv)
    d = Options()
    pg = a.backend == "postgres"
    processors = a.processors if a.processors is not None else (4 if pg else d.processors)
    restarts = a.db_restarts if a.db_restarts is not None else (4 if pg else 0)
    if processors < 1 or a.writers < 1 or a.rounds < 0:
        print("need at least one writer and one processor", file=sys.stderr)
        return 2
    opts = Options(
        rounds=a.rounds,
        seconds=a.seconds,
        seed=a.seed,
        writers=a.writers,
        processors=processors,
        power_cuts=a.power_cuts,
        tmpfs=a.tmpfs,
        fault_rate=a.fault_rate,
        pace=a.pace,
        drain_timeout=a.drain_timeout,
        workdir=a.workdir,
        keep=a.keep,
        backend=a.backend,
        db_restarts=restarts,
    )
    report = torture(opts)
    print(report.text(), flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
