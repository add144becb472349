"""The verbs for trying mailspool on one machine: ``devserver`` and ``demo``.

Neither needs a relay, a configuration or a spool set up beforehand.
``devserver`` runs :class:`~mailspool.devserver.DevServer`, a local SMTP
sink, in the foreground.  ``demo`` walks through the main job with the real
parts -- a spool in a temporary directory, a transaction that commits and
one that aborts, the devserver as the relay, the queue processor
delivering -- and prints what arrived where: the second command of the
README's quick start.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

import click

from mailspool.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    STATE_NAMES,
    fail,
    setup_logging,
    stop_on_signals,
    summary_line,
)
from mailspool.devserver import DEFAULT_PORT, DevServer, make_maildir
from mailspool.errors import MailspoolError

if TYPE_CHECKING:
    import transaction

    from mailspool.delivery import QueuedMailDelivery
    from mailspool.processor.loop import Summary

__all__ = ["COMMANDS"]


@click.command(short_help="A local SMTP sink for development.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port (0: any free one)."
)
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
    setup_logging(verbose, ctx)
    if not 0 <= port <= 65535:
        fail(f"port: must be between 0 and 65535, got {port} (from --port)", EXIT_USAGE)
    if maildir is not None:
        try:
            make_maildir(maildir)
        except OSError as exc:
            where = exc.filename if isinstance(exc.filename, str) else maildir
            fail(f"maildir: cannot store messages in {where}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        server = DevServer(host, port, maildir=maildir, echo=sys.stdout, echo_body=body)
    except OSError as exc:
        fail(f"devserver: cannot listen on {host}:{port}: {exc.strerror or exc}")
    with stop_on_signals() as stop, server:
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


def _walk_through(base: str, manager: transaction.TransactionManager) -> bool:
    """The demonstration itself, in directory ``base``; True when all arrived."""
    from mailspool.delivery import QueuedMailDelivery
    from mailspool.processor.loop import QueueProcessor
    from mailspool.smtp.mailer import SMTPMailer

    spool_dir = os.path.join(base, "spool")
    maildir = os.path.join(base, "relay-maildir")
    echo = click.echo

    def rel(path: str) -> str:
        return os.path.relpath(path, base)

    with DevServer("127.0.0.1", 0, maildir=maildir) as relay:
        delivery = QueuedMailDelivery(spool_dir, transaction_manager=manager)
        spool = delivery.spool
        echo(f"  spool:  {rel(spool_dir)}/")
        echo(f"  relay:  devserver on 127.0.0.1:{relay.port}, storing into {rel(maildir)}/")
        echo("")
        sent_ids = _commit_then_abort(delivery, manager, spool_dir)
        echo("3. The queue processor delivers to the relay.")
        mailer = SMTPMailer("127.0.0.1", relay.port, tls="none", timeout=10.0)
        with QueueProcessor(spool, mailer, connections=2, interval=0.5) as processor:
            summary: Summary = processor.drain()
        relay.wait_for(len(_DEMO_MESSAGES), 10.0)
        echo(f"   {summary_line(summary)}")
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
        return summary.sent == len(_DEMO_MESSAGES) and relay.count == len(_DEMO_MESSAGES)


def _commit_then_abort(
    delivery: QueuedMailDelivery, manager: transaction.TransactionManager, spool_dir: str
) -> list[str]:
    """Steps 1 and 2 of the demonstration; the Message-Ids of the committed mail."""
    echo = click.echo
    spool = delivery.spool
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
    return sent_ids


@click.command()
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
    setup_logging(verbose, ctx)
    if directory:
        base = os.path.abspath(directory)
        try:
            os.makedirs(base, exist_ok=True)
        except OSError as exc:
            fail(f"demo: cannot create {base}: {exc.strerror or exc}")
    else:
        base = tempfile.mkdtemp(prefix="mailspool-demo-")
    click.echo(f"mailspool demo in {base}")
    import transaction

    manager = transaction.TransactionManager()
    try:
        ok = _walk_through(base, manager)
    except MailspoolError as exc:
        fail(f"demo: {exc}")
    except BaseException:
        # Whatever stopped it (a reader that closed the pipe, Ctrl-C), the
        # transaction it was in ends here: aborted, nothing was sent.
        manager.abort()
        raise
    finally:
        if not directory and not keep:
            shutil.rmtree(base, ignore_errors=True)
    click.echo("")
    if directory or keep:
        click.echo(f"The files are in {base}")
        click.echo(f"  mailspool --queue {os.path.join(base, 'spool')} status")
    else:
        click.echo("(The temporary directory was removed; use --keep to look at the files.)")
    return EXIT_OK if ok else EXIT_FAILED


#: The verbs of this module, for :mod:`mailspool.cli.main` to register.
COMMANDS: tuple[click.Command, ...] = (devserver, demo)
