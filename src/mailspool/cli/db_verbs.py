"""The ``db`` verbs: the PostgreSQL queue's schema, and moving a spool into it.

``mailspool db init`` creates the schema (and applies every migration),
``mailspool db upgrade`` applies the missing ones, ``mailspool db import
SPOOLDIR`` moves a Maildir spool's messages into the database (see
:mod:`mailspool.postgres.importer`).  All three take the queue from
``--queue postgresql://...`` (or ``MAILSPOOL_QUEUE``, or the config file),
like every other verb, opened as every verb opens it
(:mod:`mailspool.cli.opening`).  The password never comes from the command line: libpq
reads ``PGPASSWORD`` or ``~/.pgpass``, mailspool the file named by
``MAILSPOOL_DB_PASSWORD_FILE``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from mailspool.cli.common import (
    EXIT_FAILED,
    EXIT_NO_QUEUE,
    EXIT_OK,
    EXIT_USAGE,
    common_options,
    fail,
    reason,
    settings,
)
from mailspool.cli.opening import open_postgres, postgres_target
from mailspool.errors import SpoolError
from mailspool.queue import is_postgres_url

if TYPE_CHECKING:
    pass

__all__ = ["COMMANDS"]


def _url(ctx: click.Context, kw: dict[str, Any]) -> str:
    url = settings(ctx, kw).queue
    if not url or not is_postgres_url(url):
        fail("db: --queue must be a postgresql:// URL", EXIT_USAGE)
    return url


def _migrate(url: str, *, create: bool) -> int:
    from mailspool.postgres.connect import display_name
    from mailspool.postgres.schema import SCHEMA_VERSION, SchemaError, apply_migrations

    target = postgres_target(url)
    name = display_name(target)
    try:
        conn = target.connect(autocommit=True)
    except SpoolError as exc:
        fail(reason(exc), EXIT_NO_QUEUE)
    import psycopg

    with conn:
        try:
            applied = apply_migrations(conn, target.schema, create=create)
        except SchemaError as exc:
            fail(f"queue {name}: {exc}", EXIT_NO_QUEUE)
        except psycopg.Error as exc:
            fail(f"queue {name}: {reason(exc)}", EXIT_FAILED)
    if not applied:
        click.echo(f"queue {name}: schema {target.schema} is current (version {SCHEMA_VERSION})")
    else:
        done = ", ".join(str(n) for n in applied)
        click.echo(
            f"queue {name}: schema {target.schema} at version {SCHEMA_VERSION} "
            f"(applied migration {done})"
        )
    return EXIT_OK


@click.group(short_help="PostgreSQL queue: create, upgrade, import a spool.")
def db() -> None:
    """Manage a PostgreSQL queue (--queue postgresql://user@host/dbname?schema=NAME).

    The password comes from PGPASSWORD, ~/.pgpass or the file named by
    MAILSPOOL_DB_PASSWORD_FILE, never from the URL.
    """


@db.command(short_help="Create the queue's schema and tables.")
@common_options
@click.pass_context
def init(ctx: click.Context, /, **kw: Any) -> int:
    """Create the queue's schema (default mailspool) and its tables.

    Safe to run again: an existing schema is brought up to date.
    """
    return _migrate(_url(ctx, kw), create=True)


@db.command(short_help="Apply the schema migrations this version needs.")
@common_options
@click.pass_context
def upgrade(ctx: click.Context, /, **kw: Any) -> int:
    """Apply the schema migrations this version of mailspool needs.

    All of them in one transaction: an upgrade that fails changes nothing.
    """
    return _migrate(_url(ctx, kw), create=False)


@db.command("import", short_help="Move a Maildir spool's messages into the database.")
@click.argument("spooldir", metavar="SPOOLDIR")
@common_options
@click.pass_context
def import_(ctx: click.Context, /, spooldir: str, **kw: Any) -> int:
    """Move every message of the Maildir spool SPOOLDIR into the PostgreSQL queue.

    Each message keeps its ID, state, recipients and attempts; it leaves the
    spool only once it is committed in the database, and running the import
    again after a crash neither loses nor doubles one. Stop the processors
    of the spool first. Messages being sent are left (exit code 1: run again).
    """
    from mailspool.maildir.spool import Spool
    from mailspool.postgres.importer import import_spool

    queue = open_postgres(_url(ctx, kw))
    try:
        spool = Spool(spooldir, create=False)
    except (SpoolError, OSError) as exc:
        fail(f"spool {spooldir}: {reason(exc)}", EXIT_NO_QUEUE)

    def report(id: str, why: str) -> None:
        click.echo(f"mailspool: {id}: left in the spool: {why}", err=True)

    try:
        summary = import_spool(spool, queue, report=report)
    except (SpoolError, OSError) as exc:
        fail(f"import stopped (what was moved stays moved; run again): {reason(exc)}")
    finally:
        queue.close()
    click.echo(
        f"imported {summary.imported} message(s) from {spooldir} into {queue.location}"
        + (f"; {summary.already} were there already" if summary.already else "")
        + (f"; {summary.left} left in the spool" if summary.left else "")
    )
    return EXIT_FAILED if summary.left else EXIT_OK


#: The verbs of this module, for :mod:`mailspool.cli.main` to register.
COMMANDS: tuple[click.Command, ...] = (db,)
