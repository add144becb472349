"""The ``mailspool`` command: run the queue processor, inspect and repair the queue.

This module is the command's frame: the click group with the options every
verb shares, :func:`build_parser`, and :func:`main`, which turns every
failure into one line on stderr and an exit code.  The verbs live in
modules of their own and are registered here; none of them imports this
module:

- :mod:`mailspool.cli.delivery_verbs` -- ``run``, ``drain``, ``send``;
- :mod:`mailspool.cli.queue_verbs` -- ``status``, ``list``, ``show``, ``retry``,
  ``delete``, ``hold``, ``release``;
- :mod:`mailspool.cli.check_verb` -- ``check`` (health checks, monitoring);
- :mod:`mailspool.cli.config_verb` -- ``config``;
- :mod:`mailspool.cli.dev_verbs` -- ``devserver``, ``demo``;
- :mod:`mailspool.cli.db_verbs` -- ``db init``, ``db upgrade``, ``db import``
  (a PostgreSQL queue);
- :mod:`mailspool.cli.common` -- what they share (options, settings, exit
  codes).

Settings come from :mod:`mailspool.cli.settings` (flags > environment > TOML
file > defaults) and are checked before anything is touched.

:func:`main` never lets a traceback out: every failure is one line on
stderr, and the exit code says what kind of failure it was:

====  ==========================================================================
code  meaning
====  ==========================================================================
0     done
1     something failed: a message failed, was quarantined or stayed
      deferred (``drain``, ``run --once``), the relay was unavailable, an ID
      was not found, a message could not be queued, ``check`` found a
      problem, an unexpected error
2     usage or configuration error (nothing was touched)
3     the queue does not exist, is not a spool, or cannot be read
130   interrupted (Ctrl-C); the messages in flight were finished
====  ==========================================================================
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence

import click

from mailspool.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NO_QUEUE,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    common_options,
)
from mailspool.cli.settings import ConfigError

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

log = logging.getLogger("mailspool.cli")

#: Each verb, and the module that defines it: a verb's module is imported
#: only when that verb (or the list of them, for ``--help``) is asked for,
#: so ``mailspool status`` does not pay for the processor's and the SMTP
#: modules that ``run`` needs.
_VERBS: dict[str, str] = {
    **dict.fromkeys(("run", "drain", "send"), "delivery_verbs"),
    **dict.fromkeys(
        ("status", "list", "show", "retry", "delete", "hold", "release"), "queue_verbs"
    ),
    "check": "check_verb",
    "config": "config_verb",
    **dict.fromkeys(("devserver", "demo"), "dev_verbs"),
    "db": "db_verbs",
}


class _Verbs(click.Group):
    """The group whose verbs are imported when first named (see :data:`_VERBS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *_VERBS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _VERBS:
            module = importlib.import_module(f"mailspool.cli.{_VERBS[cmd_name]}")
            for command in module.COMMANDS:
                self.add_command(command)
        return self.commands.get(cmd_name)


@click.group(
    cls=_Verbs,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@common_options
@click.version_option(
    package_name="mailspool", prog_name="mailspool", message="%(prog)s %(version)s"
)
@click.pass_context
def cli(
    ctx: click.Context,
    /,
    queue: str | None,
    config: str | None,
    verbose: int,
    log_format: str | None,
    log_addresses: bool | None,
) -> None:
    """Deliver, inspect and repair a mailspool queue.

    Settings come from flags, then the environment (MAILSPOOL_QUEUE,
    MAILSPOOL_HOST, ...), then a TOML file (--config or MAILSPOOL_CONFIG),
    then defaults; `mailspool config` shows the result and where each value
    came from. The relay password is never a flag: it comes from
    MAILSPOOL_PASSWORD, a password file, or a config file only its owner
    can read.

    Exit codes: 0 done; 1 something failed, was quarantined or stayed
    deferred (or `check` found a problem); 2 usage or configuration error;
    3 queue not found or unreadable; 130 interrupted.

    Try `mailspool demo` to see the whole path on this machine.
    """
    ctx.obj = {
        "queue": queue,
        "config": config,
        "verbose": verbose,
        "log_format": log_format,
        "log_addresses": log_addresses,
    }


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
        with click.Context(group, info_name="mailspool", **group.context_settings) as ctx:
            click.echo(group.get_help(ctx), err=True)
        return EXIT_USAGE
    try:
        result = group.main(args=args, prog_name="mailspool", standalone_mode=False)
    except CommandError as exc:
        _error(str(exc))
        return exc.code
    except (click.exceptions.Abort, KeyboardInterrupt):
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
