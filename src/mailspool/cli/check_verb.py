"""``mailspool check``: one line and an exit code for health checks and monitoring.

``status`` describes the queue and always exits 0; a container healthcheck,
a systemd timer or a monitoring agent needs a verdict instead. ``check``
compares the queue with thresholds -- failed and quarantined messages, how
long the oldest ready message has waited, whether a processor paused the
relay (it says so in the spool: :mod:`mailspool.processor.relayfile`), and
with ``--relay`` whether a session with the relay opens -- and exits 0 when
all is well, 1 when something needs a person. The codes follow the
monitoring plugin convention (0 OK, 1 WARNING, 3 UNKNOWN for a queue that
cannot be read); 2 stays what it is for every verb, a usage or configuration
error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import click

from mailspool.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    STATE_NAMES,
    age_text,
    common_options,
    fail,
    relay_options,
    relay_state,
    resolve,
    when,
)
from mailspool.cli.opening import open_spool, reading
from mailspool.cli.settings import ConfigError, Settings, parse_duration
from mailspool.queue import QueueBackend

__all__ = ["COMMANDS"]


def _paused_until(spool: QueueBackend, now: float) -> float | None:
    """Until when the last processor to say so paused the relay; None when it did not."""
    state = relay_state(spool) or {}
    until = state.get("paused_until")
    if isinstance(until, (int, float)) and not isinstance(until, bool) and until > now:
        return float(until)
    return None


def _probe_relay(settings: Settings) -> str | None:
    """None when a session with the relay opens (greeting, EHLO, TLS, AUTH); else why not."""
    from mailspool.errors import MailspoolError
    from mailspool.smtp.mailer import SMTPMailer

    try:
        mailer = SMTPMailer(**settings.mailer_options())
    except ValueError as exc:
        fail(f"relay: {exc}", EXIT_USAGE)
    try:
        with mailer.connect():
            return None
    except (MailspoolError, OSError) as exc:
        return " ".join(str(exc).split())
    finally:
        mailer.close()


@click.command(short_help="Exit 1 when the queue needs a person (for health checks).")
@click.option(
    "--max-failed",
    metavar="N",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Failed messages allowed.",
)
@click.option(
    "--max-quarantined",
    metavar="N",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Quarantined messages allowed.",
)
@click.option(
    "--max-age",
    metavar="DURATION",
    default="1h",
    show_default=True,
    help="How long the oldest ready message may have waited.",
)
@click.option(
    "--ignore-relay-pause",
    is_flag=True,
    help="Do not count a relay paused by a processor as a problem.",
)
@click.option(
    "--relay",
    "probe",
    is_flag=True,
    help="Also open a session with the relay (greeting, EHLO, TLS, AUTH, as `run` would).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common_options
@relay_options
@click.pass_context
def check(
    ctx: click.Context,
    /,
    max_failed: int,
    max_quarantined: int,
    max_age: str,
    ignore_relay_pause: bool,
    probe: bool,
    as_json: bool,
    **kw: Any,
) -> int:
    """Check the queue against thresholds: exit 0 when all is well, 1 when not.

    A problem is: more failed or quarantined messages than allowed (none, by
    default), a ready message that has waited longer than --max-age (the
    processor is not running, or cannot deliver), a relay that a processor
    paused because it could not use it (unless --ignore-relay-pause), and
    with --relay a relay to which no session opens now. Prints one line: OK
    or PROBLEM, then the problems and the counts. Exit codes: 0 OK, 1 a
    problem, 2 usage or configuration error, 3 the queue cannot be read.
    """
    try:
        age_limit = parse_duration(max_age)
    except ConfigError as exc:
        fail(f"--max-age: {exc.problem}", EXIT_USAGE)
    settings = resolve(ctx, kw).settings
    spool = open_spool(settings)
    now = time.time()
    with reading(spool):
        census = spool.census()
    counts, oldest_ready = census.counts, census.oldest_of(("ready",))
    age = None if oldest_ready is None else max(0.0, now - oldest_ready)
    problems = _over_limits(counts, max_failed, max_quarantined, age, age_limit)
    paused = None if ignore_relay_pause else _paused_until(spool, now)
    if paused is not None:
        problems.append(f"the relay is paused until {when(paused)} (it could not be used)")
    relay = _probe_relay(settings) if probe else None
    if relay is not None:
        problems.append(f"the relay cannot be used: {relay}")
    if as_json:
        out: dict[str, Any] = {"ok": not problems, "problems": problems, "queue": spool.location}
        out.update({s: int(counts.get(s, 0)) for s in STATE_NAMES})
        out["oldest_ready_age"] = None if age is None else round(age, 3)
        out["relay"] = None if not probe else ("ok" if relay is None else relay)
        out["relay_paused_until"] = paused
        click.echo(json.dumps(out))
    else:
        figures = ", ".join(f"{counts.get(s, 0)} {s.replace('_', ' ')}" for s in STATE_NAMES)
        if age is not None:
            figures += f"; oldest ready {age_text(age)}"
        if probe and relay is None:
            figures += "; relay ok"
        verdict = "PROBLEM: " + "; ".join(problems) + " -- " if problems else "OK: "
        click.echo(f"mailspool check {spool.location}: {verdict}{figures}")
    return EXIT_FAILED if problems else EXIT_OK


def _over_limits(
    counts: Mapping[str, int],
    max_failed: int,
    max_quarantined: int,
    age: float | None,
    age_limit: float,
) -> list[str]:
    """The queue's problems: counts over their limits, a ready message waiting too long."""
    problems: list[str] = []
    if counts["failed"] > max_failed:
        problems.append(f"{counts['failed']} failed (at most {max_failed} allowed)")
    if counts["quarantined"] > max_quarantined:
        problems.append(f"{counts['quarantined']} quarantined (at most {max_quarantined} allowed)")
    if age is not None and age > age_limit:
        problems.append(
            f"the oldest ready message has waited {age_text(age)} "
            f"(at most {age_text(age_limit)} allowed)"
        )
    return problems


#: The verbs of this module, for :mod:`mailspool.cli` to register.
COMMANDS: tuple[click.Command, ...] = (check,)
