"""The ``mailspool`` command: run the queue processor, inspect and repair the queue.

Every verb is a small function over the library: :class:`~mailspool.spool.Spool`
for inspection and repair, :class:`~mailspool.processor.QueueProcessor` with an
:class:`~mailspool.mailer.SMTPMailer` for delivery,
:class:`~mailspool.delivery.QueuedMailDelivery` for ``send``.  Settings come
from :mod:`mailspool.config` (flags > environment > TOML file > defaults) and
are checked before anything is touched.

:func:`main` never lets a traceback out: every failure is one line on
stderr, and the exit code says what kind of failure it was:

====  ==========================================================================
code  meaning
====  ==========================================================================
0     done
1     something failed: a message failed or stayed deferred (``drain``,
      ``run --once``), an ID was not found, a message could not be queued
2     usage or configuration error (nothing was touched)
3     the queue does not exist or cannot be read
130   interrupted (Ctrl-C)
====  ==========================================================================
"""

from __future__ import annotations

import contextlib
import datetime
import email.parser
import email.policy
import email.utils
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from mailspool.config import FIELDS, ConfigError, Settings, load_settings
from mailspool.devserver import DEFAULT_PORT, DevServer
from mailspool.errors import InvalidAddress, InvalidMessage, MailspoolError, SpoolError

if TYPE_CHECKING:
    from mailspool.processor import QueueProcessor, Summary
    from mailspool.spool import Spool, SpoolEntry

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NO_QUEUE",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "build_parser",
    "main",
]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_QUEUE = 3
EXIT_INTERRUPTED = 130

STATE_NAMES = ("ready", "in_flight", "deferred", "held", "failed", "quarantined")

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(Exception):
    """Stop the command with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    raise CommandError(message, code)


# --- options -------------------------------------------------------------------

_FLAG_HELP = {f.name: f"{f.help[:1].upper()}{f.help[1:]}" for f in FIELDS}


def _env_help(name: str) -> str:
    env = next(f.env for f in FIELDS if f.name == name)
    return f"{_FLAG_HELP[name]}. [env {env}]"


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(func: F) -> F:
        for deco in reversed(decorators):
            func = deco(func)
        return func

    return apply


_common_options = _options(
    click.option("--queue", metavar="PATH", help=_env_help("queue")),
    click.option(
        "--config",
        metavar="FILE",
        help="Read settings from this TOML file. [env MAILSPOOL_CONFIG]",
    ),
    click.option("-v", "--verbose", count=True, help="Log more (-vv: debug)."),
)

_relay_options = _options(
    click.option("--host", metavar="HOST", help=_env_help("host")),
    click.option("--port", metavar="PORT", help=_env_help("port")),
    click.option("--tls", metavar="starttls|implicit|none", help=_env_help("tls")),
    click.option("--username", metavar="NAME", help=_env_help("username")),
    click.option(
        "--password-file",
        metavar="FILE",
        help="Read the AUTH password from this file (there is no password flag: "
        "use this or the environment). [env MAILSPOOL_PASSWORD, MAILSPOOL_PASSWORD_FILE]",
    ),
    click.option("--ca-file", metavar="FILE", help=_env_help("ca_file")),
    click.option(
        "--no-verify-certificates",
        "verify_certificates",
        flag_value="false",
        default=None,
        help="Do not verify the relay's certificate (insecure). "
        "[env MAILSPOOL_VERIFY_CERTIFICATES]",
    ),
    click.option(
        "--allow-plaintext-auth",
        flag_value="true",
        default=None,
        help="Allow AUTH without TLS (exposes the password). [env MAILSPOOL_ALLOW_PLAINTEXT_AUTH]",
    ),
    click.option("--local-hostname", metavar="NAME", help=_env_help("local_hostname")),
    click.option("--connect-timeout", metavar="DURATION", help=_env_help("connect_timeout")),
    click.option("--timeout", metavar="DURATION", help=_env_help("timeout")),
    click.option("--data-timeout", metavar="DURATION", help=_env_help("data_timeout")),
)

_processor_options = _options(
    click.option("--connections", metavar="N", help=_env_help("connections")),
    click.option("--interval", metavar="DURATION", help=_env_help("interval")),
    click.option("--rate-limit", metavar="PER_SECOND", help=_env_help("rate_limit")),
    click.option("--first-delay", metavar="DURATION", help=_env_help("first_delay")),
    click.option("--max-delay", metavar="DURATION", help=_env_help("max_delay")),
    click.option("--give-up-after", metavar="DURATION", help=_env_help("give_up_after")),
)

_SETTING_FLAGS = {f.name for f in FIELDS} | {"password_file"}
_COMMON = ("queue", "config", "verbose")


def _settings(ctx: click.Context, /, kw: dict[str, Any]) -> Settings:
    """Merge the group's and the verb's flags and load the settings.

    Removes the setting flags from ``kw`` (what is left is the verb's own).
    """
    group: dict[str, Any] = ctx.find_root().obj or {}
    flags: dict[str, object] = {}
    for name in list(kw):
        if name in _SETTING_FLAGS or name in _COMMON:
            value = kw.pop(name)
            if name in _COMMON and not value:
                value = group.get(name)
            if name not in ("config", "verbose"):
                flags[name] = value
            elif name == "verbose":
                _setup_logging(int(value or 0), ctx)
            else:
                group["config"] = value
    try:
        return load_settings(flags, config_file=group.get("config"))
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)


def _setup_logging(verbose: int, ctx: click.Context) -> None:
    base = logging.INFO if ctx.info_name == "run" else logging.WARNING
    level = max(logging.DEBUG, base - 10 * verbose)
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Logs to whatever ``sys.stderr`` is now (main() may run many times in a process)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _open_spool(settings: Settings, *, create: bool = False) -> Spool:
    from mailspool.spool import Spool

    path = settings.queue
    if not path:
        _fail(
            "queue: no queue given; use --queue PATH, MAILSPOOL_QUEUE or queue = ... "
            "in the config file",
            EXIT_USAGE,
        )
    if not create:
        if not os.path.isdir(path):
            _fail(f"queue {path}: not found", EXIT_NO_QUEUE)
        if not os.access(path, os.R_OK | os.X_OK):
            _fail(f"queue {path}: permission denied", EXIT_NO_QUEUE)
    try:
        return Spool(path, create=create)
    except SpoolError as exc:
        _fail(f"queue {path}: {_reason(exc)}", EXIT_NO_QUEUE)
    except OSError as exc:
        _fail(f"queue {path}: {exc.strerror or exc}", EXIT_NO_QUEUE)


def _reason(exc: BaseException) -> str:
    text = str(exc.args[-1]) if isinstance(exc, OSError) and exc.args else str(exc)
    return " ".join(text.split())


def _make_processor(settings: Settings, spool: Spool) -> QueueProcessor:
    from mailspool.mailer import SMTPMailer
    from mailspool.processor import QueueProcessor, RetryPolicy

    try:
        mailer = SMTPMailer(**settings.mailer_options())
    except ValueError as exc:
        _fail(f"relay: {exc}", EXIT_USAGE)
    retry = RetryPolicy(
        first_delay=settings.first_delay,
        max_delay=settings.max_delay,
        give_up_after=settings.give_up_after,
    )
    return QueueProcessor(
        spool,
        mailer,
        connections=settings.connections,
        interval=settings.interval,
        retry=retry,
        rate_limit=settings.rate_limit,
    )


# --- formatting -------------------------------------------------------------------


def _age(seconds: float) -> str:
    """A short human duration: 42s, 5m, 2h 5m, 3d 4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


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


def _summary_line(summary: Summary) -> str:
    text = (
        f"{summary.sent} sent, {summary.deferred} deferred, {summary.failed} failed, "
        f"{summary.quarantined} quarantined"
    )
    if summary.relay_paused:
        text += "; the relay was unavailable (its messages stay queued)"
    return text


def _summary_code(summary: Summary) -> int:
    bad = summary.failed or summary.deferred or summary.relay_paused
    return EXIT_FAILED if bad else EXIT_OK


def _entry_json(entry: SpoolEntry) -> dict[str, Any]:
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
    }


def _read_message(spool: Spool, entry: SpoolEntry) -> bytes | None:
    """The message bytes of ``entry`` (without the envelope), or None."""
    from mailspool.spool import AREAS, decode_file

    path = os.path.join(spool.path, AREAS[entry.state], entry.id)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        _, data = decode_file(raw, verify=False, mtime=entry.queued_at or 0.0)
    except (OSError, ValueError):
        return None
    return data


def _headers(data: bytes) -> list[tuple[str, str]]:
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    msg = parser.parsebytes(data)
    return [(k, " ".join(str(v).split())) for k, v in msg.items()]


def _state(value: str | None) -> str | None:
    if value is None:
        return None
    name = value.replace("-", "_").lower()
    if name not in STATE_NAMES:
        _fail(f"--state: must be one of {', '.join(STATE_NAMES)}; got {value!r}", EXIT_USAGE)
    return name


def _entries(spool: Spool, state: str | None = None) -> Iterator[SpoolEntry]:
    try:
        yield from spool.entries(state)
    except SpoolError as exc:
        _fail(f"queue {spool.path}: {_reason(exc)}", EXIT_NO_QUEUE)


@contextlib.contextmanager
def _mail_events(callback: Callable[[Any], None]) -> Iterator[None]:
    """Call ``callback`` with each sent/deferred/failed event while the block runs."""
    import zope.event

    from mailspool.events import MailDeferred, MailFailed, MailSent

    def subscriber(event: object) -> None:
        if isinstance(event, (MailSent, MailDeferred, MailFailed)):
            callback(event)

    zope.event.subscribers.append(subscriber)
    try:
        yield
    finally:
        zope.event.subscribers.remove(subscriber)


# --- the command ------------------------------------------------------------------


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@_common_options
@click.version_option(package_name="mailspool", prog_name="mailspool")
@click.pass_context
def cli(ctx: click.Context, /, queue: str | None, config: str | None, verbose: int) -> None:
    """Deliver, inspect and repair a mailspool queue.

    Settings come from flags, then the environment (MAILSPOOL_QUEUE,
    MAILSPOOL_HOST, ...), then a TOML file (--config or MAILSPOOL_CONFIG),
    then defaults. The relay password is read only from MAILSPOOL_PASSWORD or
    a password file, never from a flag.

    Exit codes: 0 done; 1 something failed or stayed deferred; 2 usage or
    configuration error; 3 queue not found or unreadable; 130 interrupted.

    Try `mailspool demo` to see the whole path on this machine.
    """
    ctx.obj = {"queue": queue, "config": config, "verbose": verbose}


@cli.command(short_help="Run the queue processor in the foreground.")
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.option(
    "--create",
    is_flag=True,
    help="Create the spool (mode 0700) if it does not exist yet, instead of exit code 3.",
)
@_common_options
@_relay_options
@_processor_options
@click.pass_context
def run(ctx: click.Context, /, once: bool, create: bool, **kw: Any) -> int:
    """Run the queue processor in the foreground (for systemd, containers).

    Delivers what is due, then keeps watching the queue. SIGTERM or SIGINT
    stops it cleanly: messages being sent are finished, nothing new is
    started. With --once it makes one pass and exits: 0 when everything
    due was sent, 1 when something failed or stayed deferred.

    The spool must exist (exit code 3 otherwise) unless --create is given:
    a mistyped path then does not silently make a queue nobody writes to.
    """
    settings = _settings(ctx, kw)
    spool = _open_spool(settings, create=create)
    processor = _make_processor(settings, spool)
    if once:
        summary = processor.process_once()
        processor.stop()
        click.echo(_summary_line(summary))
        return _summary_code(summary)
    processor.run()
    return EXIT_OK


@cli.command()
@_common_options
@_relay_options
@_processor_options
@click.pass_context
def drain(ctx: click.Context, /, **kw: Any) -> int:
    """Deliver everything that is due now, then exit.

    Shows a progress bar on a terminal (plain lines otherwise) and a summary.
    Exit code 1 if any message failed or stayed deferred.
    """
    settings = _settings(ctx, kw)
    spool = _open_spool(settings)
    processor = _make_processor(settings, spool)
    total = sum(1 for _ in spool.due())
    err = sys.stderr
    bar_cm: contextlib.AbstractContextManager[Any] = (
        click.progressbar(length=total, label="delivering", file=err, show_pos=True)
        if total and err.isatty()
        else contextlib.nullcontext(None)
    )
    seen: set[object] = set()
    lock = threading.Lock()
    last_line = time.monotonic()  # plain lines only when it takes a while

    def handled(event: Any) -> None:
        # One event per outcome; a message partly sent and partly failed has two.
        nonlocal last_line
        with lock:
            key = event.message_id or id(event)
            if key in seen:
                return
            seen.add(key)
            if bar is not None:
                bar.update(1)
            elif time.monotonic() - last_line >= 1.0:
                last_line = time.monotonic()
                click.echo(f"{len(seen)}/{total} messages handled", err=True)

    # The drain runs in a thread so that this one can take SIGINT/SIGTERM and
    # stop it the clean way: nothing new started, messages in flight settled.
    outcome: list[Summary] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            outcome.append(processor.drain())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=work, name="mailspool-drain", daemon=True)
    with bar_cm as bar, _mail_events(handled):
        with _stop_on_signals() as stopped:
            worker.start()
            while worker.is_alive() and not stopped.is_set():
                worker.join(0.1)
        if stopped.is_set():
            # The default handlers are back: a second Ctrl-C quits at once.
            click.echo(
                "\nstopping: finishing the messages in flight (Ctrl-C again to quit now)",
                err=True,
            )
        processor.stop()
        worker.join()
        if failure:
            raise failure[0]
        summary = outcome[0]
        if bar is not None and not stopped.is_set():
            bar.update(max(0, min(total, summary.total) - len(seen)))
    if stopped.is_set():
        click.echo(f"stopped {spool.path}: {_summary_line(summary)}")
        _fail("interrupted; the messages in flight were finished", EXIT_INTERRUPTED)
    click.echo(f"drained {spool.path}: {_summary_line(summary)}")
    return _summary_code(summary)


@cli.command(short_help="Counts per state, oldest message, next retry.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_common_options
@click.pass_context
def status(ctx: click.Context, /, as_json: bool, **kw: Any) -> int:
    """Counts per state, the oldest message's age, the next retry time.

    With --json: one object with integer counts under ready, in_flight,
    deferred, held, failed and quarantined, plus total, oldest_queued_at,
    oldest_age, next_retry_at and next_retry_in (seconds; null when none).
    """
    settings = _settings(ctx, kw)
    spool = _open_spool(settings)
    now = time.time()
    counts = spool.counts()
    oldest: float | None = None
    for state in ("ready", "in_flight", "deferred", "held"):
        if not counts.get(state):
            continue
        for entry in _entries(spool, state):
            if entry.queued_at is not None and (oldest is None or entry.queued_at < oldest):
                oldest = entry.queued_at
    next_retry = spool.next_due()
    if as_json:
        out: dict[str, Any] = {"queue": spool.path}
        out.update({s: int(counts.get(s, 0)) for s in STATE_NAMES})
        out["total"] = sum(out[s] for s in STATE_NAMES)
        out["oldest_queued_at"] = oldest
        out["oldest_age"] = None if oldest is None else round(max(0.0, now - oldest), 3)
        out["next_retry_at"] = next_retry
        out["next_retry_in"] = None if next_retry is None else round(max(0.0, next_retry - now), 3)
        click.echo(json.dumps(out))
        return EXIT_OK
    click.echo(f"queue {spool.path}")
    for s in STATE_NAMES:
        extra = ""
        if s == "deferred" and next_retry is not None:
            extra = f"   next retry {_when(next_retry)} (in {_age(next_retry - now)})"
        click.echo(f"  {s.replace('_', ' '):<12} {counts.get(s, 0):>7}{extra}")
    if oldest is not None:
        click.echo(f"  oldest waiting message: queued {_age(now - oldest)} ago ({_when(oldest)})")
    return EXIT_OK


@cli.command("list")
@click.option(
    "--state",
    metavar="STATE",
    help="Only this state: ready, in_flight, deferred, held, failed, quarantined.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of messages.")
@_common_options
@click.pass_context
def list_(ctx: click.Context, /, state: str | None, as_json: bool, **kw: Any) -> int:
    """List the messages in the queue, like mailq.

    One line per message (ID, state, age, size, attempts, sender and
    recipients), the last error indented below it.
    """
    settings = _settings(ctx, kw)
    spool = _open_spool(settings)
    wanted = _state(state)
    now = time.time()
    out = sys.stdout
    if as_json:
        out.write("[")
        for i, entry in enumerate(_entries(spool, wanted)):
            out.write(("," if i else "") + "\n  " + json.dumps(_entry_json(entry)))
        out.write("\n]\n")
        return EXIT_OK
    n = 0
    for entry in _entries(spool, wanted):
        if n == 0:
            click.echo(f"{'ID':<40} {'STATE':<11} {'AGE':>7} {'SIZE':>6} {'TRIES':>5}  FROM -> TO")
        n += 1
        age = _age(now - entry.queued_at) if entry.queued_at else "?"
        rcpts = ", ".join(
            r.address + ("" if r.status == "pending" else f" ({r.status})")
            for r in entry.recipients
        )
        click.echo(
            f"{entry.id:<40} {entry.state:<11} {age:>7} {_size(entry.size):>6} "
            f"{entry.attempts:>5}  {entry.sender or '<>'} -> {rcpts}"
        )
        if entry.last_error:
            click.echo(f"    {' '.join(entry.last_error.split())}")
    click.echo(f"{n} message{'s' if n != 1 else ''}" + (f" {wanted}" if wanted else ""))
    return EXIT_OK


@cli.command(short_help="Show one message: envelope, replies, headers.")
@click.argument("message_id", metavar="ID")
@click.option("--body", is_flag=True, help="Print the whole message too.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_common_options
@click.pass_context
def show(ctx: click.Context, /, message_id: str, body: bool, as_json: bool, **kw: Any) -> int:
    """Show one message: envelope, attempts, each recipient's last reply, headers.

    The body is printed only with --body.
    """
    settings = _settings(ctx, kw)
    spool = _open_spool(settings)
    try:
        entry = spool.get(message_id)
    except KeyError:
        _fail(f"{message_id}: not in the queue")
    except ValueError as exc:
        _fail(f"{message_id}: {exc}")
    except SpoolError as exc:
        _fail(f"{message_id}: {_reason(exc)}")
    data = _read_message(spool, entry)
    headers = _headers(data) if data is not None else []
    if as_json:
        obj = _entry_json(entry)
        obj["headers"] = [[k, v] for k, v in headers]
        if body:
            obj["message"] = None if data is None else data.decode("utf-8", "replace")
        click.echo(json.dumps(obj, indent=2))
        return EXIT_OK
    rows = [
        ("id", entry.id),
        ("state", entry.state),
        ("message-id", entry.message_id or "-"),
        ("queued", _when(entry.queued_at) if entry.queued_at else "?"),
        ("attempts", str(entry.attempts)),
        ("size", f"{entry.size} bytes"),
        ("from", entry.sender or "<>"),
    ]
    if entry.next_attempt is not None:
        rows.append(("next attempt", _when(entry.next_attempt)))
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
    if headers:
        click.echo("headers:")
        for k, v in headers:
            click.echo(f"  {k}: {v}")
    if body:
        click.echo("")
        if data is None:
            _fail(f"{message_id}: the message cannot be read")
        click.echo(data.decode("utf-8", "replace").replace("\r\n", "\n"), nl=False)
    return EXIT_OK


def _each(spool: Spool, ids: Sequence[str], action: Callable[[str], None], done: str) -> int:
    code = EXIT_OK
    for id in ids:
        try:
            action(id)
        except KeyError:
            click.echo(f"mailspool: {id}: not in the queue", err=True)
            code = EXIT_FAILED
        except (SpoolError, ValueError) as exc:
            click.echo(f"mailspool: {id}: {_reason(exc)}", err=True)
            code = EXIT_FAILED
        else:
            click.echo(f"{id}: {done}")
    return code


@cli.command()
@click.argument("ids", metavar="ID...", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every deferred and failed message.")
@_common_options
@click.pass_context
def retry(ctx: click.Context, /, ids: tuple[str, ...], all_: bool, **kw: Any) -> int:
    """Make deferred or failed messages ready now.

    Failed recipients become pending again; recipients already sent stay
    sent. A quarantined message can be retried by its ID once its file is
    repaired.
    """
    settings = _settings(ctx, kw)
    if bool(ids) == all_:
        _fail("retry: give message IDs or --all (not both)", EXIT_USAGE)
    spool = _open_spool(settings)
    if all_:
        ids = tuple(e.id for s in ("deferred", "failed") for e in list(_entries(spool, s)))
        if not ids:
            click.echo("nothing to retry")
            return EXIT_OK
    return _each(spool, ids, spool.retry, "ready")


@cli.command()
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@_common_options
@click.pass_context
def delete(ctx: click.Context, /, ids: tuple[str, ...], **kw: Any) -> int:
    """Remove messages from the queue for good (not while being sent)."""
    spool = _open_spool(_settings(ctx, kw))
    return _each(spool, ids, spool.delete, "deleted")


@cli.command()
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@_common_options
@click.pass_context
def hold(ctx: click.Context, /, ids: tuple[str, ...], **kw: Any) -> int:
    """Keep ready or deferred messages from being sent until released."""
    spool = _open_spool(_settings(ctx, kw))
    return _each(spool, ids, spool.hold, "held")


@cli.command()
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@_common_options
@click.pass_context
def release(ctx: click.Context, /, ids: tuple[str, ...], **kw: Any) -> int:
    """Make held messages ready again."""
    spool = _open_spool(_settings(ctx, kw))
    return _each(spool, ids, spool.release, "ready")


# --- send -------------------------------------------------------------------------


def _split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block with its line ends, the rest starting at the blank line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            j = i + len(sep) // 2
            return data[:j], data[j:]
    return data, b""


def _drop_header(headers: bytes, name: bytes) -> bytes:
    """Remove every ``name:`` field (with its continuation lines)."""
    out: list[bytes] = []
    skipping = False
    lname = name.lower() + b":"
    for line in headers.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line[: len(lname)].lower() == lname
        if not skipping:
            out.append(line)
    return b"".join(out)


@cli.command(short_help="Queue a message read from stdin, like sendmail -t -i.")
@click.argument("recipients", metavar="[TO]...", nargs=-1)
@click.option("-f", "--from", "sender", metavar="ADDRESS", help="The envelope sender.")
@click.option(
    "-t",
    "--read-recipients",
    is_flag=True,
    help="Also send to the To, Cc and Bcc addresses of the message (Bcc is removed).",
)
@click.option("-i", "ignore_dots", is_flag=True, hidden=True)
@_common_options
@click.pass_context
def send(
    ctx: click.Context,
    /,
    recipients: tuple[str, ...],
    sender: str | None,
    read_recipients: bool,
    ignore_dots: bool,
    **kw: Any,
) -> int:
    """Queue a message read from standard input, like `sendmail -t -i`.

    The message is written durably to the queue (created if missing); a
    running `mailspool run` delivers it. The sender is -f, else the From
    address of the message, else USER@HOST; a From header is added when
    missing. A line with a single dot is message text, not the end.
    """
    settings = _settings(ctx, kw)
    stdin = getattr(sys.stdin, "buffer", None)
    data = stdin.read() if stdin is not None else b""
    if not data.strip():
        _fail("send: no message on standard input")
    head, rest = _split_message(data)
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    rcpts = list(recipients)
    if read_recipients:
        fields = [str(v) for k in ("To", "Cc", "Bcc") for v in msg.get_all(k, [])]
        rcpts += [addr for _, addr in email.utils.getaddresses(fields) if addr]
        head = _drop_header(head, b"bcc")
    if not rcpts:
        _fail("send: no recipients; give addresses or use -t", EXIT_USAGE)
    if sender is None:
        from_header = msg.get("From")
        sender = email.utils.parseaddr(str(from_header))[1] if from_header else ""
        if not sender:
            try:
                user = getpass.getuser()
            except (KeyError, OSError):  # no login name (a container's numeric user)
                user = "mailspool"
            sender = f"{user}@{socket.getfqdn()}"
    if msg.get("From") is None:
        nl = b"\r\n" if head.endswith(b"\r\n") or b"\r\n" in rest[:2] else b"\n"
        head = f"From: {sender}".encode() + nl + head
    import transaction

    from mailspool.delivery import QueuedMailDelivery

    spool = _open_spool(settings, create=True)
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool.path, transaction_manager=manager)
    try:
        with manager:
            message_id = delivery.send(sender, rcpts, head + rest)
    except (InvalidAddress, InvalidMessage) as exc:
        _fail(f"send: {exc}")
    except SpoolError as exc:
        _fail(f"send: not queued: {_reason(exc)}")
    log.info("queued <%s> for %s", message_id, ", ".join(rcpts))
    return EXIT_OK


# --- devserver and demo -------------------------------------------------------------


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (main thread only)."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals are the main thread's business
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@cli.command(short_help="A local SMTP sink for development.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port.")
@click.option("--maildir", metavar="DIR", help="Also store each message in this Maildir.")
@click.option("--body", is_flag=True, help="Print each whole message, not only a summary.")
@click.option("-v", "--verbose", count=True, help="Log more (-vv: debug).")
@click.pass_context
def devserver(
    ctx: click.Context, /, host: str, port: int, maildir: str | None, body: bool, verbose: int
) -> int:
    """A local SMTP sink for development: accepts everything, delivers nothing.

    Prints one line per message received (and stores it in --maildir when
    given). Point mailspool at it with `--host 127.0.0.1 --port 8025 --tls
    none`. Stop it with Ctrl-C.
    """
    _setup_logging(verbose, ctx)
    try:
        server = DevServer(host, port, maildir=maildir, echo=sys.stdout, echo_body=body)
    except OSError as exc:
        _fail(f"devserver: cannot listen on {host}:{port}: {exc.strerror or exc}")
    with _stop_on_signals() as stop, server:
        where = f", storing into {os.path.abspath(maildir)}" if maildir else ""
        click.echo(
            f"devserver listening on {server.host}:{server.port}{where}; Ctrl-C to stop",
            err=True,
        )
        while not stop.wait(0.5):
            pass
    click.echo(f"devserver stopped after {server.count} message(s)", err=True)
    return EXIT_OK


_DEMO_MESSAGES = (
    ("Jane Doe <jane@example.org>", "Your order #1001 has shipped"),
    ('"Doe, John" <john@example.org>', "Your invoice for order #1002"),
    ("ops@example.net", "Daily report: 2 orders, 0 errors"),
)


def _demo_message(to: str, subject: str) -> bytes:
    return (
        f"From: Demo Shop <shop@example.com>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Hello,\r\n\r\nthis message was queued by `mailspool demo`.\r\n"
    ).encode()


@cli.command()
@click.option("--dir", "directory", metavar="DIR", help="Work in DIR (kept) instead of a temp dir.")
@click.option("--keep", is_flag=True, help="Keep the temporary directory to look at the files.")
@click.option("-v", "--verbose", count=True, help="Log more (-vv: debug).")
@click.pass_context
def demo(ctx: click.Context, /, directory: str | None, keep: bool, verbose: int) -> int:
    """Show the main job on this machine, with nothing to set up.

    Makes a spool in a temporary directory, commits three messages in one
    transaction and aborts a fourth, starts the devserver as the relay on a
    free loopback port, lets the queue processor deliver, and shows what
    arrived where.
    """
    import transaction

    from mailspool.delivery import QueuedMailDelivery
    from mailspool.mailer import SMTPMailer
    from mailspool.processor import QueueProcessor

    _setup_logging(verbose, ctx)
    base = os.path.abspath(directory) if directory else tempfile.mkdtemp(prefix="mailspool-demo-")
    os.makedirs(base, exist_ok=True)
    spool_dir = os.path.join(base, "spool")
    maildir = os.path.join(base, "relay-maildir")
    echo = click.echo

    def rel(path: str) -> str:
        return os.path.relpath(path, base)

    try:
        with DevServer("127.0.0.1", 0, maildir=maildir) as relay:
            manager = transaction.TransactionManager()
            delivery = QueuedMailDelivery(spool_dir, transaction_manager=manager)
            spool = delivery.spool
            echo(f"mailspool demo in {base}")
            echo(f"  spool:  {rel(spool_dir)}/")
            echo(f"  relay:  devserver on 127.0.0.1:{relay.port}, storing into {rel(maildir)}/")
            echo("")
            echo("1. One transaction sends 3 messages, then commits.")
            manager.begin()
            sent_ids: list[str] = []
            for to, subject in _DEMO_MESSAGES:
                mid = delivery.send("shop@example.com", [to], _demo_message(to, subject))
                sent_ids.append(mid)
                echo(f"     send() -> <{mid}>  to {to}")
            echo(f"   before commit: {spool.counts()['ready']} message(s) in the queue")
            manager.commit()
            echo(f"   after commit:  {spool.counts()['ready']} message(s) ready in spool/new/")
            echo("")
            echo("2. Another transaction sends 1 message, then aborts.")
            manager.begin()
            delivery.send(
                "shop@example.com",
                ["nobody@example.org"],
                _demo_message("nobody@example.org", "This is never sent"),
            )
            manager.abort()
            leftovers = len(os.listdir(os.path.join(spool_dir, "tmp")))
            echo(
                f"   after abort:   still {spool.counts()['ready']} ready; "
                f"{leftovers} file(s) left in spool/tmp/"
            )
            echo("")
            echo("3. The queue processor delivers to the relay.")
            mailer = SMTPMailer("127.0.0.1", relay.port, tls="none", timeout=10.0)
            processor = QueueProcessor(spool, mailer, connections=2, interval=0.5)
            summary = processor.drain()
            processor.stop()
            relay.wait_for(len(_DEMO_MESSAGES), 10.0)
            echo(f"   {_summary_line(summary)}")
            echo("")
            echo("4. What arrived where:")
            order = {mid: n for n, mid in enumerate(sent_ids)}
            for got in sorted(relay.received, key=lambda r: order.get(r.message_id, 99)):
                echo(f"   {', '.join(got.recipients):<20} {got.subject!r}")
                echo(f"       Message-Id <{got.message_id}>")
                echo(f"       stored in {rel(got.path) if got.path else '(memory)'}")
            counts = spool.counts()
            left = ", ".join(f"{s} {counts.get(s, 0)}" for s in STATE_NAMES)
            echo("")
            echo(f"5. The queue afterwards: {left}")
            aborted = [r for r in relay.received if "nobody@example.org" in r.recipients]
            echo(f"   The aborted message reached the relay {len(aborted)} time(s).")
    except MailspoolError as exc:
        _fail(f"demo: {exc}")
    finally:
        if not directory and not keep:
            shutil.rmtree(base, ignore_errors=True)
    echo("")
    if directory or keep:
        echo(f"The files are in {base}")
        echo(f"  mailspool --queue {spool_dir} status")
    else:
        echo("(The temporary directory was removed; use --keep to look at the files.)")
    ok = summary.sent == len(_DEMO_MESSAGES) and relay.count == len(_DEMO_MESSAGES)
    return EXIT_OK if ok else EXIT_FAILED


# --- entry point --------------------------------------------------------------------


def build_parser() -> click.Group:
    """The ``mailspool`` click group with every verb."""
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; never raises, returns the exit code.

    Args:
        argv: the arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 done, 1 something failed, 2 usage or configuration error, 3 queue
        not found or unreadable, 130 interrupted.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    group = build_parser()
    if not args:
        with click.Context(group, info_name="mailspool") as ctx:
            click.echo(group.get_help(ctx), err=True)
        return EXIT_USAGE
    try:
        result = group.main(args=args, prog_name="mailspool", standalone_mode=False)
    except CommandError as exc:
        _error(str(exc))
        return exc.code
    except click.exceptions.Abort:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except click.UsageError as exc:
        hint = ""
        if exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        _error(exc.format_message() + hint)
        return EXIT_USAGE
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`mailspool list | head`): stop quietly, as
        # click does when it sees this first.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except SystemExit as exc:  # click's own exit on a broken pipe
        return exc.code if isinstance(exc.code, int) else EXIT_FAILED
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        _error(f"unexpected error: {type(exc).__name__}: {exc} (run with -vv for details)")
        return EXIT_FAILED
    return result if isinstance(result, int) else EXIT_OK


def _error(message: str) -> None:
    line = " ".join(str(message).split())
    with contextlib.suppress(OSError):
        print(f"mailspool: {line}", file=sys.stderr, flush=True)
