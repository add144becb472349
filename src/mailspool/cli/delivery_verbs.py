"""The verbs that move mail: ``run`` and ``drain`` deliver the queue, ``send`` fills it.

``run`` is the service (systemd, a container): the processor's own
:meth:`~mailspool.processor.QueueProcessor.run` loop, which handles SIGTERM
and SIGINT itself.  ``run --once`` and ``drain`` are commands a person
waits for; they deliver in a background thread so that the main thread can
take a signal and stop them the clean way -- nothing new started, the
messages in flight finished and settled -- instead of being cut off between
the relay's 250 and the removal from the spool (which would send a message
twice).

``send`` is the ``sendmail -t -i`` of the spool, for shell scripts and cron
jobs: a message from standard input, validated and completed by
:func:`~mailspool.message.prepare` and written the way a committed
:class:`~mailspool.delivery.QueuedMailDelivery` writes it (staged in tmp/,
fsync, renamed into new/, fsync of the directory) -- but with every failure
reported in the exit code, where a transaction's last phase could only log
it.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import email.utils
import getpass
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from mailspool.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    common_options,
    fail,
    make_processor,
    open_spool,
    processor_options,
    reading,
    reason,
    relay_options,
    settings,
    stop_on_signals,
    summary_code,
    summary_line,
)
from mailspool.cli.observe import observed
from mailspool.errors import InvalidAddress, InvalidMessage
from mailspool.message import prepare

if TYPE_CHECKING:
    from mailspool.processor.loop import QueueProcessor, Summary

__all__ = ["COMMANDS"]

log = logging.getLogger("mailspool.cli_delivery")


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


def _in_background(processor: QueueProcessor, work: Callable[[], Summary]) -> tuple[Summary, bool]:
    """Run ``work`` in a thread until it returns or SIGINT/SIGTERM arrives.

    On a signal the processor is stopped: nothing new is started and the
    messages in flight are finished.  The connections are closed either way.

    Returns:
        What ``work`` returned, and whether a signal stopped it.
    """
    outcome: list[Summary] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=target, name="mailspool-deliver", daemon=True)
    with stop_on_signals() as stopped:
        worker.start()
        while worker.is_alive() and not stopped.is_set():
            worker.join(0.1)
    if stopped.is_set():
        # The previous handlers are back: a second Ctrl-C quits at once.
        click.echo(
            "\nstopping: finishing the messages in flight (Ctrl-C again to quit now)", err=True
        )
    processor.stop()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0], stopped.is_set()


@click.command(short_help="Run the queue processor in the foreground.")
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.option(
    "--create",
    is_flag=True,
    help="Create the spool (mode 0700) if it does not exist yet, instead of exit code 3.",
)
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (needs mailspool[metrics]).",
)
@common_options
@relay_options
@processor_options
@click.pass_context
def run(ctx: click.Context, /, once: bool, create: bool, metrics: str | None, **kw: Any) -> int:
    """Run the queue processor in the foreground (for systemd, containers).

    Delivers what is due, then keeps watching the queue. SIGTERM or SIGINT
    stops it cleanly: messages being sent are finished, nothing new is
    started. With --once it makes one pass and exits: 0 when everything
    due was sent, 1 when something failed or stayed deferred.

    The spool must exist (exit code 3 otherwise) unless --create is given:
    a mistyped path then does not silently make a queue nobody writes to.
    """
    processor = make_processor(settings(ctx, kw), create=create)
    ctx.with_resource(observed(processor, metrics))
    if once:
        summary, stopped = _in_background(processor, processor.process_once)
        if stopped:
            click.echo(f"stopped: {summary_line(summary)}")
            fail("interrupted; the messages in flight were finished", EXIT_INTERRUPTED)
        click.echo(summary_line(summary))
        return summary_code(summary)
    processor.run()
    return EXIT_OK


@click.command()
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (needs mailspool[metrics]).",
)
@common_options
@relay_options
@processor_options
@click.pass_context
def drain(ctx: click.Context, /, metrics: str | None, **kw: Any) -> int:
    """Deliver everything that is due now, then exit.

    Shows a progress bar on a terminal (plain lines otherwise) and a summary.
    Exit code 1 if any message failed or stayed deferred, or the relay was
    unavailable (its messages then stay in the queue, untouched). Ctrl-C
    finishes the messages being sent and stops (exit code 130).
    """
    processor = make_processor(settings(ctx, kw))
    ctx.with_resource(observed(processor, metrics))
    spool = processor.spool
    with reading(spool):
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

    with bar_cm as bar, _mail_events(handled):
        summary, stopped = _in_background(processor, processor.drain)
        if bar is not None and not stopped:
            bar.update(max(0, min(total, summary.total) - len(seen)))
    if stopped:
        click.echo(f"stopped {spool.location}: {summary_line(summary)}")
        fail("interrupted; the messages in flight were finished", EXIT_INTERRUPTED)
    click.echo(f"drained {spool.location}: {summary_line(summary)}")
    return summary_code(summary)


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


def _default_sender() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name (a container's numeric user)
        user = "mailspool"
    return f"{user}@{socket.getfqdn()}"


@click.command(short_help="Queue a message read from stdin, like sendmail -t -i.")
@click.argument("recipients", metavar="[TO]...", nargs=-1)
@click.option("-f", "--from", "sender", metavar="ADDRESS", help="The envelope sender.")
@click.option(
    "-t",
    "--read-recipients",
    is_flag=True,
    help="Also send to the To, Cc and Bcc addresses of the message (Bcc is removed).",
)
@click.option("-i", "ignore_dots", is_flag=True, hidden=True)
@click.option("-o", "sendmail_option", metavar="OPTION", hidden=True, multiple=True)
@common_options
@click.pass_context
def send(
    ctx: click.Context,
    /,
    recipients: tuple[str, ...],
    sender: str | None,
    read_recipients: bool,
    ignore_dots: bool,
    sendmail_option: tuple[str, ...],
    **kw: Any,
) -> int:
    """Queue a message read from standard input, like `sendmail -t -i`.

    The message is written durably to the queue (created if missing); a
    running `mailspool run` delivers it. The sender is -f, else the From
    address of the message, else USER@HOST; a From header is added when
    missing. A line with a single dot is message text, not the end (-i and
    sendmail's -o options such as -oi are accepted and change nothing).
    """
    loaded = settings(ctx, kw)
    if sendmail_option:
        log.debug("sendmail options ignored: %s", " ".join(f"-o{o}" for o in sendmail_option))
    stdin = getattr(sys.stdin, "buffer", None)
    data = stdin.read() if stdin is not None else b""
    if not data.strip():
        fail("send: no message on standard input")
    head, rest = _split_message(data)
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    rcpts = list(recipients)
    if read_recipients:
        fields = [str(v) for k in ("To", "Cc", "Bcc") for v in msg.get_all(k, [])]
        rcpts += [addr for _, addr in email.utils.getaddresses(fields) if addr]
        head = _drop_header(head, b"bcc")
    if not rcpts:
        fail("send: no recipients; give addresses or use -t", EXIT_USAGE)
    if sender is None:
        from_header = msg.get("From")
        sender = email.utils.parseaddr(str(from_header))[1] if from_header else ""
        sender = sender or _default_sender()
    if msg.get("From") is None:
        nl = b"\r\n" if head.endswith(b"\r\n") or b"\r\n" in rest[:2] else b"\n"
        head = f"From: {sender}".encode() + nl + head
    try:
        prepared = prepare(sender, rcpts, head + rest)
    except (InvalidAddress, InvalidMessage) as exc:
        fail(f"send: {exc}")
    spool = open_spool(loaded, create=True)
    # What a committed QueuedMailDelivery does, without its transaction: the
    # data manager must swallow a failure after the commit (tpc_finish never
    # fails) -- here it is reported, and the exit code says the mail is not
    # in the queue.
    try:
        staged = spool.stage(prepared)
    except OSError as exc:  # SpoolError: nothing left behind
        fail(f"send: not queued: {reason(exc)}")
    try:
        spool.publish([staged])
    except OSError as exc:
        if os.path.lexists(staged.tmp_path):  # not renamed: take it back
            spool.discard([staged])
            fail(f"send: not queued: {reason(exc)}")
        fail(f"send: queued as {staged.id}, but possibly not durably: {reason(exc)}")
    message_id = prepared.message_id
    log.info("queued <%s> for %s", message_id, ", ".join(rcpts))
    return EXIT_OK


#: The verbs of this module, for :mod:`mailspool.cli.main` to register.
COMMANDS: tuple[click.Command, ...] = (run, drain, send)
