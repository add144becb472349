"""What every scenario shares: trials in fresh processes, results, reports.

A trial runs in a freshly spawned Python process (:func:`run_child`), so one
system's threads, caches and memory never leak into the next measurement, and
the peak RSS of a processor is its own.  Results are collected as series of
values per (scenario, metric, system); a trial that failed its check (the
relay's count differs from what was sent, a queue not empty...) records an
error instead of a number, and its whole row is shown as an error.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Options",
    "Results",
    "Series",
    "TrialError",
    "machine_info",
    "rotate",
    "run_child",
]

_SPAWN = multiprocessing.get_context("spawn")

#: The 1-minute load average at the start of every trial (the machine may be
#: shared: the report says how busy it was).
LOAD_SAMPLES: list[float] = []


class TrialError(Exception):
    """A trial ran but its result cannot be trusted (wrong count, leftovers)."""


@dataclass
class Options:
    """Command-line options, resolved (``--quick`` applied)."""

    quick: bool = False
    scenarios: tuple[str, ...] = ()
    messages: int | None = None
    runs: int | None = None
    scale_messages: int | None = None
    scale_fill: str = "commit"
    tmpdir: str | None = None
    install_sink: bool = False
    install_postfix: bool = False
    out: str = ""
    pg_server: str = ""
    install_django_mailer: bool = False

    def n(self, default: int, quick: int) -> int:
        if self.messages is not None:
            return self.messages
        return quick if self.quick else default

    def r(self, default: int, quick: int) -> int:
        if self.runs is not None:
            return self.runs
        return quick if self.quick else default


def _child_main(conn: Any, target: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        result = target(**kwargs)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        if isinstance(result, dict):
            result.setdefault("maxrss_kb", usage.ru_maxrss)
        conn.send(("ok", result))
    except TrialError as exc:
        conn.send(("error", str(exc)))
    except BaseException as exc:  # report anything, the parent decides
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_child(target: Callable[..., Any], timeout: float, **kwargs: Any) -> Any:
    """Run ``target(**kwargs)`` in a fresh process and return its result.

    Raises:
        TrialError: the child raised, or ran out of time (it is killed).
    """
    LOAD_SAMPLES.append(os.getloadavg()[0])
    recv, send = _SPAWN.Pipe(duplex=False)
    proc = _SPAWN.Process(target=_child_main, args=(send, target, kwargs))
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            raise TrialError(f"no result within {timeout:.0f} s")
        status, value = recv.recv()
    except EOFError:
        raise TrialError(f"child died (exit code {proc.exitcode})") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()
    if status != "ok":
        raise TrialError(value)
    return value


def rotate(items: tuple[Any, ...] | list[Any], run: int) -> list[Any]:
    """``items`` starting at a different one on each run (alternating order)."""
    k = run % len(items)
    return list(items[k:]) + list(items[:k])


@dataclass
class Series:
    scenario: str
    metric: str
    system: str
    unit: str
    better: str  # "higher" | "lower"
    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    primary: bool = False  # the mailspool row the ratios are computed from
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.values) and not self.errors

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.ok else None


class Results:
    """All series of a run, in the order they were first added."""

    def __init__(self) -> None:
        self.series: list[Series] = []
        self.notes: list[str] = []
        self.scenario_info: dict[str, dict[str, Any]] = {}

    def get(
        self,
        scenario: str,
        metric: str,
        system: str,
        unit: str,
        better: str,
        *,
        primary: bool = False,
        note: str = "",
    ) -> Series:
        for s in self.series:
            if (s.scenario, s.metric, s.system) == (scenario, metric, system):
                return s
        s = Series(scenario, metric, system, unit, better, primary=primary, note=note)
        self.series.append(s)
        return s

    def groups(self) -> Iterator[tuple[tuple[str, str], list[Series]]]:
        seen: dict[tuple[str, str], list[Series]] = {}
        for s in self.series:
            seen.setdefault((s.scenario, s.metric), []).append(s)
        yield from seen.items()

    def primary_of(self, group: list[Series]) -> Series | None:
        for s in group:
            if s.primary:
                return s
        return None

    def find(self, scenario: str, metric: str, system: str) -> Series | None:
        for s in self.series:
            if (s.scenario, s.metric, s.system) == (scenario, metric, system):
                return s
        return None

    # -- reports ------------------------------------------------------------

    def ratio(self, primary: Series | None, s: Series) -> float | None:
        if primary is None or s is primary or not primary.ok or not s.ok:
            return None
        pm, sm = primary.median, s.median
        if pm is None or sm is None or sm == 0:
            return None
        return pm / sm

    def table(self) -> str:
        header = ("scenario", "metric", "system", "median", "min-max", "n", "mailspool/this")
        rows: list[tuple[str, ...]] = []
        for (scenario, metric), group in self.groups():
            primary = self.primary_of(group)
            first = True
            for s in group:
                label = f"{metric} ({s.unit}, {s.better} is better)"
                med, rng = _median_and_range(s, "ERROR", 70)
                r = self.ratio(primary, s)
                rows.append(
                    (
                        scenario if first else "",
                        label if first else "",
                        s.system,
                        med,
                        rng,
                        str(len(s.values)),
                        _ratio(r),
                    )
                )
                first = False
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False))]
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            if r[0]:
                lines.append("")
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
        return "\n".join(lines)

    def markdown(self) -> str:
        out = ["| scenario | metric | system | median | min-max | n | mailspool/this |"]
        out.append("|---|---|---|---:|---|---:|---:|")
        for (scenario, metric), group in self.groups():
            primary = self.primary_of(group)
            for i, s in enumerate(group):
                where = f"{scenario} | {metric} ({s.unit})" if i == 0 else " | "
                med, rng = _median_and_range(s, "**error**", 80)
                r = self.ratio(primary, s)
                out.append(
                    f"| {where} | {s.system} | {med} | {rng} | {len(s.values)} | {_ratio(r)} |"
                )
        return "\n".join(out)

    def to_json(self, extra: dict[str, Any]) -> dict[str, Any]:
        series = []
        for (_scenario, _metric), group in self.groups():
            primary = self.primary_of(group)
            for s in group:
                d = asdict(s)
                d["median"] = s.median
                d["min"] = min(s.values) if s.ok else None
                d["max"] = max(s.values) if s.ok else None
                d["ratio_mailspool_to_this"] = self.ratio(primary, s)
                series.append(d)
        return {**extra, "notes": self.notes, "scenarios": self.scenario_info, "series": series}

    def plot(self, path: str, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = list(self.groups())
        if not groups:
            return
        ncols = 2
        nrows = (len(groups) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(14, 3.2 * nrows), squeeze=False)
        colors = {"mailspool": "#1f77b4", "zope.sendmail": "#ff7f0e", "repoze.sendmail": "#2ca02c"}
        for ax, ((scenario, metric), group) in zip(axes.flat, groups, strict=False):
            labels, meds, lo, hi, cols = [], [], [], [], []
            for s in group:
                labels.append(s.system)
                if s.ok:
                    m = statistics.median(s.values)
                    meds.append(m)
                    lo.append(m - min(s.values))
                    hi.append(max(s.values) - m)
                else:
                    meds.append(0.0)
                    lo.append(0.0)
                    hi.append(0.0)
                base = s.system.split(" ")[0]
                cols.append(colors.get(base, "#7f7f7f"))
            y = list(range(len(labels)))
            ax.barh(y, meds, xerr=[lo, hi], color=cols, capsize=3)
            ax.set_yticks(y)
            ax.set_yticklabels(labels, fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{scenario}: {metric}", fontsize=9)
            ax.set_xlabel(f"{group[0].unit} ({group[0].better} is better)", fontsize=8)
            for yi, s in zip(y, group, strict=False):
                text = "error" if s.errors else (fmt(statistics.median(s.values)) if s.ok else "")
                ax.text(0, yi, " " + text, va="center", fontsize=7, color="black")
            positive = [m for m in meds if m > 0]
            if positive and max(positive) / min(positive) > 50:
                ax.set_xscale("log")
        for ax in list(axes.flat)[len(groups) :]:
            ax.axis("off")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        fig.savefig(path, dpi=110)
        plt.close(fig)


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions(*dists: str) -> dict[str, str]:
    """The installed version of each distribution ("not installed" for a missing one)."""
    return {d: _version(d) for d in dists}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fstype(path: str) -> str:
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", path],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        return out or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(tmpdir: str) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "spool_filesystem": f"{tmpdir}: {_fstype(tmpdir)}",
        "load_at_start": os.getloadavg(),
        "versions": {
            d: _version(d)
            for d in ("mailspool", "zope.sendmail", "repoze.sendmail", "aiosmtpd", "transaction")
        },
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def _ratio(r: float | None) -> str:
    if r is None:
        return ""
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _median_and_range(s: Any, error_label: str, width: int) -> tuple[str, str]:
    """The median and min-max cells of a series (or its error, or "not run")."""
    if s.errors:
        return error_label, s.errors[0].splitlines()[0][:width]
    if not s.values:
        return "—", "not run"
    return fmt(statistics.median(s.values)), f"{fmt(min(s.values))}-{fmt(max(s.values))}"
