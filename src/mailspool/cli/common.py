"""What every verb of the ``mailspool`` command shares.

The verbs live in modules of their own (:mod:`mailspool.cli.queue_verbs`,
:mod:`mailspool.cli.delivery_verbs`, :mod:`mailspool.cli.dev_verbs`,
:mod:`mailspool.cli.config_verb`) and :mod:`mailspool.cli.main` assembles them; this
module is what they have in common, so that none of them needs to import
:mod:`mailspool.cli.main`: the exit codes, :class:`CommandError` (how a verb
stops with one line and a code), the option groups built from the settings
table, loading the settings, the signal handling of the delivering verbs,
and small formatting helpers.  How a verb opens the queue is
:mod:`mailspool.cli.opening`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from mailspool.cli.settings import FIELDS, ConfigError, LoadedSettings, Settings, resolve_settings
from mailspool.errors import SpoolError
from mailspool.queue import State

if TYPE_CHECKING:
    from mailspool.processor.loop import Summary
    from mailspool.queue import QueueBackend

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NO_QUEUE",
    "EXIT_OK",
    "EXIT_USAGE",
    "STATE_NAMES",
    "CommandError",
    "OneLineFormatter",
    "age_text",
    "common_options",
    "fail",
    "processor_options",
    "reason",
    "relay_options",
    "resolve",
    "settings",
    "setup_logging",
    "stop_on_signals",
    "summary_code",
    "summary_line",
    "when",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_QUEUE = 3
EXIT_INTERRUPTED = 130

#: The states of a spooled message, in the order the command shows them.
STATE_NAMES = tuple(str(s) for s in State)

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(Exception):
    """Stop the command with one line on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Stop the command: ``message`` on stderr, exit code ``code``.

    Raises:
        CommandError: always.
    """
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


#: ``--queue``, ``--config``, ``-v``: on the group and on every queue verb.
common_options = _options(
    click.option("--queue", metavar="PATH", help=_env_help("queue")),
    click.option(
        "--config",
        metavar="FILE",
        help="Read settings from this TOML file. [env MAILSPOOL_CONFIG]",
    ),
    click.option("-v", "--verbose", count=True, help="Log more (-vv: debug)."),
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        envvar="MAILSPOOL_LOG_FORMAT",
        help="Log lines as text (default) or one JSON object each. [env MAILSPOOL_LOG_FORMAT]",
    ),
    click.option(
        "--log-addresses",
        is_flag=True,
        default=None,
        help="Show full email addresses in JSON logs (default: only their domains).",
    ),
)

#: How to reach the relay: on the verbs that deliver.
relay_options = _options(
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
    click.option(
        "--no-pipelining",
        "pipelining",
        flag_value="false",
        default=None,
        help="Wait for each reply even when the relay offers PIPELINING (for a relay "
        "that gets it wrong). [env MAILSPOOL_PIPELINING]",
    ),
    click.option("--local-hostname", metavar="NAME", help=_env_help("local_hostname")),
    click.option("--connect-timeout", metavar="DURATION", help=_env_help("connect_timeout")),
    click.option("--timeout", metavar="DURATION", help=_env_help("timeout")),
    click.option("--data-timeout", metavar="DURATION", help=_env_help("data_timeout")),
)

#: How the processor works and retries: on the verbs that deliver.
processor_options = _options(
    click.option("--connections", metavar="N", help=_env_help("connections")),
    click.option("--interval", metavar="DURATION", help=_env_help("interval")),
    click.option("--rate-limit", metavar="PER_SECOND", help=_env_help("rate_limit")),
    click.option("--first-delay", metavar="DURATION", help=_env_help("first_delay")),
    click.option("--max-delay", metavar="DURATION", help=_env_help("max_delay")),
    click.option("--backoff-factor", metavar="FACTOR", help=_env_help("backoff_factor")),
    click.option("--give-up-after", metavar="DURATION", help=_env_help("give_up_after")),
    click.option("--relay-first-delay", metavar="DURATION", help=_env_help("relay_first_delay")),
    click.option("--relay-max-delay", metavar="DURATION", help=_env_help("relay_max_delay")),
)

_SETTING_FLAGS = {f.name for f in FIELDS} | {"password_file"}
_COMMON = ("queue", "config", "verbose", "log_format", "log_addresses")
_LOGGING = ("verbose", "log_format", "log_addresses")


def resolve(ctx: click.Context, /, kw: dict[str, Any]) -> LoadedSettings:
    """Merge the group's and the verb's flags; load the settings and their origins.

    Removes the setting flags from ``kw`` (what is left is the verb's own)
    and sets up logging for ``-v``.

    Raises:
        CommandError: a bad setting (exit code 2).
    """
    group: dict[str, Any] = ctx.find_root().obj or {}
    flags: dict[str, object] = {}
    logging_kw: dict[str, Any] = {}
    for name in list(kw):
        if name in _SETTING_FLAGS or name in _COMMON:
            value = kw.pop(name)
            if name in _COMMON and not value:
                value = group.get(name)
            if name in _LOGGING:
                logging_kw[name] = value
            elif name != "config":
                flags[name] = value
            else:
                group["config"] = value
    if "verbose" in logging_kw:
        setup_logging(
            int(logging_kw["verbose"] or 0),
            ctx,
            json_lines=logging_kw.get("log_format") == "json",
            addresses=bool(logging_kw.get("log_addresses")),
        )
    try:
        return resolve_settings(flags, config_file=group.get("config"))
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def settings(ctx: click.Context, /, kw: dict[str, Any]) -> Settings:
    """:func:`resolve`, the settings only."""
    return resolve(ctx, kw).settings


def setup_logging(
    verbose: int, ctx: click.Context, *, json_lines: bool = False, addresses: bool = False
) -> None:
    """Log to stderr: INFO for ``run``, WARNING for the others; each ``-v`` one level more.

    Tracebacks are shown only with ``-vv``; below that an error logged with
    its exception stays one line (the exception's type and text appended).
    ``json_lines``: one JSON object per line (:mod:`mailspool.jsonlog`),
    addresses reduced to their domain unless ``addresses``.
    """
    base = logging.INFO if ctx.info_name == "run" else logging.WARNING
    level = max(logging.DEBUG, base - 10 * verbose)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        root.addHandler(handler)
    if json_lines:
        from mailspool.jsonlog import JsonFormatter

        handler.setFormatter(JsonFormatter(addresses=addresses, tracebacks=verbose >= 2))
    else:
        handler.setFormatter(OneLineFormatter(tracebacks=verbose >= 2))
    root.setLevel(level)


class OneLineFormatter(logging.Formatter):
    """``time LEVEL logger: message``; a traceback only when asked for.

    Args:
        tracebacks: append the traceback of a record's exception (``-vv``);
            otherwise only ``(TypeName: text)`` on the same line.
    """

    def __init__(self, *, tracebacks: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not self.tracebacks:
            exc = record.exc_info[1]
            record = logging.makeLogRecord(record.__dict__)
            if exc is not None:
                text = " ".join(str(exc).split())
                record.msg = f"{record.getMessage()} ({type(exc).__name__}: {text})"
                record.args = None
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return super().format(record)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Logs to whatever ``sys.stderr`` is now (main() may run many times in a process)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


# --- the spool and the processor -----------------------------------------------------


def reason(exc: BaseException) -> str:
    """The text of an error, on one line (an OSError without its errno prefix)."""
    text = str(exc.args[-1]) if isinstance(exc, OSError) and exc.args else str(exc)
    return " ".join(text.split())


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (main thread only).

    The previous handlers are back after the block: a second Ctrl-C then
    interrupts at once.
    """
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


# --- formatting -------------------------------------------------------------------


def age_text(seconds: float) -> str:
    """A short human duration: 42s, 5m, 2h 5m, 3d 4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def when(ts: float) -> str:
    """A local ISO 8601 time, to the second."""
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def summary_line(summary: Summary) -> str:
    """``"3 sent, 0 deferred, 0 failed, 0 quarantined"`` (and a word on the relay)."""
    text = (
        f"{summary.sent} sent, {summary.deferred} deferred, {summary.failed} failed, "
        f"{summary.quarantined} quarantined"
    )
    if summary.partly:
        text += (
            f"; {summary.partly} of the deferred and failed went to some of their "
            "recipients (partly delivered)"
        )
    if summary.relay_paused:
        text += "; the relay was unavailable (its messages stay queued)"
    if summary.unwritten:
        text += (
            f"; {summary.unwritten} outcome(s) could not be written to the spool "
            "(the log above says why): those messages stay claimed until they are"
        )
    return text


def summary_code(summary: Summary) -> int:
    """0 when everything due was sent; 1 when something failed, was quarantined,
    stayed deferred or waits."""
    bad = (
        summary.failed
        or summary.quarantined
        or summary.deferred
        or summary.relay_paused
        or summary.unwritten
    )
    return EXIT_FAILED if bad else EXIT_OK


def relay_state(spool: QueueBackend) -> dict[str, Any] | None:
    """What the last processor wrote about the relay (a Maildir spool keeps it
    in ``.relay-state.json``, a PostgreSQL queue in its ``relay_state``
    table); None when none wrote it, or it cannot be read."""
    from mailspool.processor import relayfile

    try:
        return relayfile.latest(spool)
    except SpoolError:
        return None
