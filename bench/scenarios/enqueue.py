"""Enqueue: ``send()`` + commit, 1 and 100 messages per transaction.

Each trial, in a fresh process, builds the inputs first (untimed: bytes, or
for repoze.sendmail, which takes nothing else, an ``email.message.Message``
parsed from the same bytes), then times the loop of transactions.  The spool
must then hold exactly N committed messages.

The floor is what a durable queue cannot avoid, on the same disk, with the
same bytes: per message ``open(O_CREAT|O_EXCL)``, write, ``fsync``, close,
``rename`` into ``new/``, then ``fsync`` of ``new/`` once per transaction.
zope.sendmail and repoze.sendmail do not fsync at all.
"""

from __future__ import annotations

import os
import time
from typing import Any

from harness import TrialError, rotate, run_child
from scenarios import Env
from systems import MAILSPOOL, REPOZE, ZOPE, Runner, make_messages, pending

__all__ = ["enqueue_trial", "floor_trial", "run"]

NAME = "enqueue"
FLOOR = "fsync floor (write+fsync+rename+dir fsync)"


def enqueue_trial(system: str, path: str, n: int, per_tx: int, tag: str) -> dict[str, Any]:
    runner = Runner(system, path, 0)
    inputs = runner.inputs(make_messages(n, tag))
    runner.delivery()  # creates the spool directories, untimed
    t0 = time.perf_counter()
    runner.enqueue(inputs, per_tx)
    elapsed = time.perf_counter() - t0
    queued = pending(system, path)
    if queued != n:
        raise TrialError(f"{queued} messages in the spool, {n} were committed")
    return {"elapsed": elapsed}


def floor_trial(path: str, n: int, per_tx: int, tag: str) -> dict[str, Any]:
    messages = [d for _, _, d in make_messages(n, tag)]
    tmp = os.path.join(path, "tmp")
    new = os.path.join(path, "new")
    os.makedirs(tmp)
    os.makedirs(new)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    t0 = time.perf_counter()
    for start in range(0, n, per_tx):
        names = []
        for i in range(start, min(n, start + per_tx)):
            name = f"{i}.{tag}"
            fd = os.open(os.path.join(tmp, name), flags, 0o600)
            data = messages[i]
            if os.write(fd, data) != len(data):
                raise TrialError("short write")
            os.fsync(fd)
            os.close(fd)
            names.append(name)
        for name in names:
            os.rename(os.path.join(tmp, name), os.path.join(new, name))
        dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
    elapsed = time.perf_counter() - t0
    if len(os.listdir(new)) != n:
        raise TrialError("floor: files missing")
    return {"elapsed": elapsed}


def run(env: Env) -> None:
    opts = env.opts
    n = opts.n(2000, 300)
    runs = opts.r(5, 2)
    scenario = "enqueue"
    env.results.scenario_info[scenario] = {
        "messages": n,
        "runs": runs,
        "inputs": "bytes for mailspool and zope.sendmail; email.message.Message "
        "(parsed beforehand, untimed) for repoze.sendmail",
        "durability": "mailspool and the floor fsync file and directory; "
        "zope.sendmail and repoze.sendmail never fsync",
    }
    variants = [
        (MAILSPOOL, MAILSPOOL),
        (f"{ZOPE} (no fsync)", ZOPE),
        (f"{REPOZE} (no fsync)", REPOZE),
        (FLOOR, "floor"),
    ]
    for per_tx in (1, 100):
        metric = "1 message per transaction" if per_tx == 1 else "100 messages per transaction"
        series = {
            label: env.results.get(
                scenario, metric, label, "messages/s", "higher", primary=(label == MAILSPOOL)
            )
            for label, _ in variants
        }
        for r in range(runs):
            for label, system in rotate(variants, r):
                s = series[label]
                if s.errors:
                    continue
                path = env.spool(system)
                try:
                    if system == "floor":
                        out = run_child(
                            floor_trial, 600, path=path, n=n, per_tx=per_tx, tag=env.tag()
                        )
                    else:
                        out = run_child(
                            enqueue_trial,
                            600,
                            system=system,
                            path=path,
                            n=n,
                            per_tx=per_tx,
                            tag=env.tag(),
                        )
                except TrialError as exc:
                    s.errors.append(str(exc))
                    print(f"  {scenario} / {metric} / {label}: ERROR {str(exc).splitlines()[0]}")
                    continue
                finally:
                    env.cleanup(path)
                rate = n / out["elapsed"]
                s.values.append(rate)
                print(f"  {scenario} / {metric} / {label} run {r + 1}: {rate:,.0f} messages/s")
