"""The verbs that look at and repair the queue: status, list, show, retry, delete, hold, release.

Postfix's ``mailq`` and ``postsuper`` are the models.  Each verb is a thin
layer over :class:`~mailspool.spool.Spool` (counts, entries, get, and the
moves between states); this module adds only what a person or a monitoring
script reads: aligned text, or JSON with ``--json``.  Nothing here delivers
mail, and a verb that only looks never creates or changes the spool.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import click

from mailspool.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    STATE_NAMES,
    age_text,
    common_options,
    fail,
    reason,
    relay_state,
    relay_states,
    settings,
    when,
)
from mailspool.cli.opening import open_spool, reading
from mailspool.errors import SpoolError
from mailspool.queue import age_order

if TYPE_CHECKING:
    from mailspool.queue import QueueBackend as Spool
    from mailspool.queue import QueueEntry as SpoolEntry

__all__ = ["COMMANDS", "entry_json"]


def _size(n: int) -> str:
    """A short human size: 812, 4.2K, 17K, 3.1M."""
    if n < 1024:
        return str(n)
    value = float(n)
    for unit in ("K", "M", "G"):
        value /= 1024
        if value < 1024 or unit == "G":
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    raise AssertionError("unreachable")


#: What ``list`` shows as the state of a ready message while the relay is paused.
RELAY_WAIT = "relay-wait"


def _pause(relay: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """The relay pause a processor noted (see mailspool.processor.relayfile), if still on."""
    until = relay.get("paused_until") if relay is not None else None
    if relay is None or not isinstance(until, (int, float)) or until <= now:
        return None
    return {
        "relay": relay.get("relay"),
        "until": until,
        "in": round(until - now, 3),
        "reason": relay.get("reason"),
    }


def _pause_text(pause: dict[str, Any], now: float) -> str:
    why = f": {pause['reason']}" if pause.get("reason") else ""
    return (
        f"relay {pause['relay']} is paused until {when(pause['until'])} "
        f"(in {age_text(pause['until'] - now)}){why}"
    )


def entry_json(entry: SpoolEntry, pause: dict[str, Any] | None = None) -> dict[str, Any]:
    """One message as the plain object ``list --json`` and ``show --json`` print.

    ``pause``: the relay's pause (:func:`_pause`); a ready message then has
    it under ``waiting_on_relay`` (else null).
    """
    return {
        "id": entry.id,
        "state": entry.state,
        "message_id": entry.message_id,
        "sender": entry.sender,
        "recipients": [
            {"address": r.address, "status": r.status, "code": r.code, "text": r.text}
            for r in entry.recipients
        ],
        "queued_at": entry.queued_at,
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "size": entry.size,
        "last_error": entry.last_error,
        "legacy": entry.legacy,
        "priority": entry.priority,
        "waiting_on_relay": pause if entry.state == "ready" else None,
    }


def _read_message(spool: Spool, entry: SpoolEntry) -> bytes | None:
    """The message bytes of ``entry`` (without the envelope), or None.

    Read through the spool, which follows no symlink and opens no FIFO, so
    ``show`` is as safe on a tampered spool as the processor is.
    """
    try:
        return spool.message(entry.id)
    except (KeyError, ValueError, SpoolError, OSError):
        return None


def _headers(data: bytes) -> list[tuple[str, str]]:
    import email.parser  # only `show` parses headers; status and list start without it
    import email.policy

    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    msg = parser.parsebytes(data)
    return [(k, " ".join(str(v).split())) for k, v in msg.items()]


def _state(value: str | None) -> str | None:
    if value is None:
        return None
    name = value.replace("-", "_").lower()
    if name not in STATE_NAMES:
        fail(f"--state: must be one of {', '.join(STATE_NAMES)}; got {value!r}", EXIT_USAGE)
    return name


def _entries(spool: Spool, state: str | None = None) -> Iterator[SpoolEntry]:
    with reading(spool):
        yield from spool.entries(state)


def _listed(spool: Spool, state: str | None, limit: int | None) -> list[SpoolEntry]:
    """By the time each was queued, oldest first (unreadable ones last, by ID);
    with ``limit``, only that many, chosen without reading the whole queue."""
    if limit is not None:
        with reading(spool):
            return spool.oldest_entries(limit, state)
    return sorted(_entries(spool, state), key=age_order)


@click.command(short_help="Counts per state, oldest message, next retry.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--watch", is_flag=True, help="A live view, refreshed each second, until Ctrl-C.")
@common_options
@click.pass_context
def status(ctx: click.Context, /, as_json: bool, watch: bool, **kw: Any) -> int:
    """Counts per state, the oldest message's age, the next retry time.

    With --json: one object with integer counts under ready, in_flight,
    deferred, held, failed and quarantined, plus total, oldest_queued_at,
    oldest_age, next_retry_at and next_retry_in (seconds; null when none),
    and under relay what a processor last learned about its relay (the
    rate it paces at, its connection limit, a pause), or null.

    With --watch: the counts, the messages sent and deferred per minute by
    the running processors, their relay, and the oldest message, each
    second (one line per second when the output is not a terminal).
    """
    spool = open_spool(settings(ctx, kw))
    if watch:
        if as_json:
            fail("status: --watch and --json cannot be combined", EXIT_USAGE)
        from mailspool.cli.observe import watch as watching

        with reading(spool):
            spool.counts()
        return watching(spool)
    now = time.time()
    with reading(spool):
        census = spool.census()  # one look at each area, however large the queue
        next_retry = spool.next_due()
    counts, oldest = census.counts, census.oldest_of()
    relays = relay_states(spool)
    relay = relays[0] if relays else None  # the latest word: what the relay is now
    pause = _pause(relay, now)
    if as_json:
        out: dict[str, Any] = {"queue": spool.location}
        out.update({s: int(counts.get(s, 0)) for s in STATE_NAMES})
        out["total"] = sum(out[s] for s in STATE_NAMES)
        out["oldest_queued_at"] = oldest
        out["oldest_age"] = None if oldest is None else round(max(0.0, now - oldest), 3)
        out["next_retry_at"] = next_retry
        out["next_retry_in"] = None if next_retry is None else round(max(0.0, next_retry - now), 3)
        out["relay"] = relay
        out["relays"] = relays
        click.echo(json.dumps(out))
        return EXIT_OK
    click.echo(f"queue {spool.location}")
    for s in STATE_NAMES:
        extra = ""
        if s == "deferred" and next_retry is not None:
            extra = f"   next retry {when(next_retry)} (in {age_text(next_retry - now)})"
        if s == "ready" and pause is not None:
            extra = f"   waiting: {_pause_text(pause, now)}"
        click.echo(f"  {s.replace('_', ' '):<12} {counts.get(s, 0):>7}{extra}")
    if oldest is not None:
        click.echo(
            f"  oldest waiting message: queued {age_text(now - oldest)} ago ({when(oldest)})"
        )
    for each in relays:  # one line per processor that wrote, the latest first
        click.echo(_relay_line(each, now))
    return EXIT_OK


def _relay_line(relay: dict[str, Any], now: float) -> str:
    """What a processor last said about its relay (see mailspool.processor.relayfile)."""
    from mailspool.processor.outcome import per_second  # the processor's modules, only here

    parts = []
    rate = relay.get("rate")
    if isinstance(rate, (int, float)):
        parts.append(f"pacing at {per_second(rate)} (learned from its replies)")
    paused = relay.get("paused_until")
    if isinstance(paused, (int, float)) and paused > now:
        why = relay.get("reason")
        parts.append(f"paused until {when(paused)}" + (f" ({why})" if why else ""))
    parts.append(f"{relay.get('connections')} connection(s)")
    written = relay.get("written_at")
    age = f", {age_text(now - written)} ago" if isinstance(written, (int, float)) else ""
    host = f" on {relay['host']}" if relay.get("host") else ""
    return (
        f"  relay {relay.get('relay')}: {', '.join(parts)} "
        f"(processor {relay.get('pid')}{host}{age})"
    )


@click.command("list")
@click.option(
    "--state",
    metavar="STATE",
    help="Only this state: ready, in_flight, deferred, held, failed, quarantined.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    metavar="N",
    help="Only the N oldest (quick on a queue of millions).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of messages.")
@common_options
@click.pass_context
def list_(
    ctx: click.Context, /, state: str | None, limit: int | None, as_json: bool, **kw: Any
) -> int:
    """List the messages in the queue, like mailq, the oldest first.

    One line per message (ID, state, priority class, age, size, attempts,
    sender and recipients), the last error indented below it. Only the head
    of each file is read.  While a processor has the relay paused, ready
    messages show as relay-wait (they go when the pause ends).
    """
    spool = open_spool(settings(ctx, kw))
    wanted = _state(state)
    now = time.time()
    pause = _pause(relay_state(spool), now)
    if as_json:
        out = sys.stdout
        out.write("[")
        for i, entry in enumerate(_listed(spool, wanted, limit)):
            out.write(("," if i else "") + "\n  " + json.dumps(entry_json(entry, pause)))
        out.write("\n]\n")
        return EXIT_OK
    n = waits = 0
    for entry in _listed(spool, wanted, limit):
        if n == 0:
            click.echo(
                f"{'ID':<40} {'STATE':<11} {'CLASS':<6} {'AGE':>7} {'SIZE':>6} {'TRIES':>5}"
                "  FROM -> TO"
            )
        n += 1
        age = age_text(now - entry.queued_at) if entry.queued_at else "?"
        rcpts = ", ".join(
            r.address + ("" if r.status == "pending" else f" ({r.status})")
            for r in entry.recipients
        )
        shown = RELAY_WAIT if pause is not None and entry.state == "ready" else entry.state
        waits += shown == RELAY_WAIT
        click.echo(
            f"{entry.id:<40} {shown:<11} {entry.priority:<6} {age:>7} {_size(entry.size):>6} "
            f"{entry.attempts:>5}  {entry.sender or '<>'} -> {rcpts}"
        )
        if entry.last_error:
            click.echo(f"    {' '.join(entry.last_error.split())}")
    shown_of = f" (the oldest; --limit {limit})" if limit is not None and n == limit else ""
    click.echo(f"{n} message{'s' if n != 1 else ''}" + (f" {wanted}" if wanted else "") + shown_of)
    if pause is not None and waits:
        click.echo(f"{RELAY_WAIT}: ready, but {_pause_text(pause, now)}")
    return EXIT_OK


@click.command(short_help="Show one message: envelope, replies, headers.")
@click.argument("message_id", metavar="ID")
@click.option("--body", is_flag=True, help="Print the whole message too.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common_options
@click.pass_context
def show(ctx: click.Context, /, message_id: str, body: bool, as_json: bool, **kw: Any) -> int:
    """Show one message: envelope, attempts, each recipient's last reply, headers.

    The body is printed only with --body. ID is the first column of
    `mailspool list`.
    """
    spool = open_spool(settings(ctx, kw))
    entry = _get(spool, message_id)
    data = _read_message(spool, entry)
    headers = _headers(data) if data is not None else []
    now = time.time()
    pause = _pause(relay_state(spool), now)
    if as_json:
        obj = entry_json(entry, pause)
        obj["headers"] = [[k, v] for k, v in headers]
        if body:
            obj["message"] = None if data is None else data.decode("utf-8", "replace")
        click.echo(json.dumps(obj, indent=2))
        return EXIT_OK
    _echo_entry(entry, _pause_text(pause, now) if pause is not None else None)
    if headers:
        click.echo("headers:")
        for k, v in headers:
            click.echo(f"  {k}: {v}")
    if body:
        click.echo("")
        if data is None:
            fail(f"{message_id}: the message cannot be read")
        click.echo(data.decode("utf-8", "replace").replace("\r\n", "\n"), nl=False)
    return EXIT_OK


def _get(spool: Spool, message_id: str) -> SpoolEntry:
    """The entry of ``message_id``; a failure is one line and exit code."""
    try:
        return spool.get(message_id)
    except KeyError:
        fail(f"{message_id}: not in the queue")
    except ValueError as exc:
        fail(f"{message_id}: {exc}")
    except (SpoolError, OSError) as exc:
        fail(f"{message_id}: {reason(exc)}")


def _echo_entry(entry: SpoolEntry, paused: str | None) -> None:
    """``show``'s lines about the envelope and each recipient (``paused``: why a
    ready message waits)."""
    rows = [
        ("id", entry.id),
        (
            "state",
            f"{entry.state} (waiting: {paused})"
            if paused is not None and entry.state == "ready"
            else entry.state,
        ),
        ("message-id", entry.message_id or "-"),
        ("priority", entry.priority),
        ("queued", when(entry.queued_at) if entry.queued_at else "?"),
        ("attempts", str(entry.attempts)),
        ("size", f"{entry.size} bytes"),
        ("from", entry.sender or "<>"),
    ]
    if entry.next_attempt is not None:
        rows.append(("next attempt", when(entry.next_attempt)))
    if entry.legacy:
        rows.append(("format", "legacy (zope.sendmail / repoze.sendmail)"))
    for key, value in rows:
        click.echo(f"{key + ':':<14}{value}")
    click.echo("recipients:")
    for r in entry.recipients:
        reply = f"  {r.code or ''} {r.text or ''}".rstrip() if (r.code or r.text) else ""
        click.echo(f"  {r.address}  {r.status}{reply}")
    if entry.last_error:
        click.echo(f"{'last error:':<14}{' '.join(entry.last_error.split())}")


def _each(spool: Spool, ids: Sequence[str], action: Callable[[str], None], done: str) -> int:
    code = EXIT_OK
    for id in ids:
        try:
            action(id)
        except KeyError:
            click.echo(f"mailspool: {id}: not in the queue", err=True)
            code = EXIT_FAILED
        except (SpoolError, OSError, ValueError) as exc:
            click.echo(f"mailspool: {id}: {reason(exc)}", err=True)
            code = EXIT_FAILED
        else:
            click.echo(f"{id}: {done}")
    return code


@click.command()
@click.argument("ids", metavar="ID...", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every deferred and failed message.")
@common_options
@click.pass_context
def retry(ctx: click.Context, /, ids: tuple[str, ...], all_: bool, **kw: Any) -> int:
    """Make deferred or failed messages ready now.

    Failed recipients become pending again; recipients already sent stay
    sent. A quarantined message can be retried by its ID once its file is
    repaired. A running `mailspool run` picks them up; otherwise
    `mailspool drain` sends them.
    """
    loaded = settings(ctx, kw)
    if bool(ids) == all_:
        fail("retry: give message IDs or --all (not both)", EXIT_USAGE)
    spool = open_spool(loaded)
    if all_:
        ids = tuple(e.id for s in ("deferred", "failed") for e in list(_entries(spool, s)))
        if not ids:
            click.echo("nothing to retry")
            return EXIT_OK
    return _each(spool, ids, spool.retry, "ready")


@click.command()
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@common_options
@click.pass_context
def delete(ctx: click.Context, /, ids: tuple[str, ...], **kw: Any) -> int:
    """Remove messages from the queue for good (not while being sent).

    Works in every state; a message being sent at that moment is left
    alone (exit code 1). There is no undo.
    """
    spool = open_spool(settings(ctx, kw))
    return _each(spool, ids, spool.delete, "deleted")


@click.command()
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@common_options
@click.pass_context
def hold(ctx: click.Context, /, ids: tuple[str, ...], **kw: Any) -> int:
    """Keep ready or deferred messages from being sent until released.

    A held message stays in the queue (state held) and is not sent until
    `mailspool release` makes it ready again.
    """
    spool = open_spool(settings(ctx, kw))
    return _each(spool, ids, spool.hold, "held")


@click.command()
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@common_options
@click.pass_context
def release(ctx: click.Context, /, ids: tuple[str, ...], **kw: Any) -> int:
    """Make held messages ready again.

    A running `mailspool run` picks them up; otherwise
    `mailspool drain` sends them.
    """
    spool = open_spool(settings(ctx, kw))
    return _each(spool, ids, spool.release, "ready")


#: The verbs of this module, for :mod:`mailspool.cli.main` to register.
COMMANDS: tuple[click.Command, ...] = (status, list_, show, retry, delete, hold, release)
