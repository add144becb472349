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
import dataclasses
import getpass
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from mailspool.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    common_options,
    fail,
    processor_options,
    reason,
    relay_options,
    settings,
    stop_on_signals,
    summary_code,
    summary_line,
)
from mailspool.cli.observe import observed
from mailspool.cli.opening import make_processor, open_spool, reading
from mailspool.errors import InvalidAddress, InvalidMessage, SpoolError
from mailspool.message import parse_mailbox, prepare
from mailspool.priority import parse_priority

if TYPE_CHECKING:
    from mailspool.message import Prepared
    from mailspool.processor.loop import QueueProcessor, Summary
    from mailspool.queue import QueueBackend

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


@contextlib.contextmanager
def _every_second(tick: Callable[[], None] | None) -> Iterator[None]:
    """Call ``tick`` once a second while the block runs (from a thread of its own).

    Time-based, so that a line comes also while nothing finishes: a slow
    relay, or one that accepted the connection and says nothing.
    """
    if tick is None:
        yield
        return
    done = threading.Event()

    def loop() -> None:
        while not done.wait(1.0):
            with contextlib.suppress(OSError):  # stderr closed: nobody to tell
                tick()

    ticker = threading.Thread(target=loop, name="mailspool-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


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
    A PostgreSQL queue whose database is down is waited for, at start and
    while running (one line when the wait begins, one when it ends); a
    database that refuses the login or has no schema is exit code 3.
    """
    processor = make_processor(settings(ctx, kw), create=create, wait=not once)
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

    def handled(event: Any) -> None:
        # One event per outcome; a message partly sent and partly failed has two.
        with lock:
            key = event.message_id or id(event)
            if key in seen:
                return
            seen.add(key)
            if bar is not None:
                bar.update(1)

    def line() -> None:
        with lock:
            click.echo(f"{len(seen)}/{total} messages handled", err=True)

    with bar_cm as bar, _mail_events(handled), _every_second(None if bar else line):
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


def _header_fields(head: bytes) -> list[tuple[str, bytes]]:
    """``(lower-case name, raw value)`` of each field, continuation lines unfolded."""
    fields: list[tuple[str, bytes]] = []
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t"):
            if fields:
                last, value = fields[-1]
                fields[-1] = (last, value + b" " + line.strip())
            continue
        raw_name, sep, value = line.partition(b":")
        if sep and re.fullmatch(rb"[!-9;-~]+", raw_name):
            fields.append((raw_name.decode("ascii").lower(), value.strip()))
    return fields


def _header_text(name: str, value: bytes) -> str:
    """The value of an address header as text: UTF-8 (RFC 6532), or a refusal.

    Decoding any other way would put a replacement character into an
    address and send to a mailbox nobody wrote.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        shown = value.decode("utf-8", "backslashreplace")
        fail(
            f"send: the {name.title()} header is not valid UTF-8 ('{shown}'); "
            "write its addresses in UTF-8"
        )


def _address_items(text: str) -> list[tuple[str, str]]:
    """The items of an address list, as written and without comments.

    Split at the commas that are outside quoted strings, comments, angle
    and square brackets; a group's name (``friends: a@x, b@y;``) and the
    ``;`` that ends it are dropped.  Empty items are left out.
    """
    items: list[tuple[str, str]] = []
    whole: list[str] = []
    bare: list[str] = []
    quoted = escaped = False
    comment = 0
    closing = ""
    for ch in text:
        whole.append(ch)
        if comment:  # comments are left out of the address
            comment, escaped = _in_comment(ch, comment, escaped)
            continue
        if escaped:
            escaped = False
        elif quoted:
            escaped = ch == "\\"
            quoted = ch != '"'
        elif ch == "(":
            comment = 1
            continue
        elif closing:
            closing = "" if ch == closing else closing
        elif ch in "<[":
            closing = ">" if ch == "<" else "]"
        elif ch == '"':
            quoted = True
        elif ch in ",;:":
            if ch != ":":
                items.append(("".join(whole[:-1]).strip(), "".join(bare).strip()))
            whole, bare = [], []
            continue
        bare.append(ch)
    items.append(("".join(whole).strip(), "".join(bare).strip()))
    return [(w, b) for w, b in items if b]


def _in_comment(ch: str, depth: int, escaped: bool) -> tuple[int, bool]:
    """One character of a comment (nested ``depth`` deep): the depth after it,
    and whether the next character is escaped."""
    if escaped:
        return depth, False
    if ch == "\\":
        return depth, True
    return depth + {"(": 1, ")": -1}.get(ch, 0), False


def _header_addresses(head: bytes, names: tuple[str, ...]) -> list[str]:
    """The mailboxes in the header fields ``names``; a bad item stops the command."""
    found: list[str] = []
    for name, raw in _header_fields(head):
        if name not in names:
            continue
        for item, bare in _address_items(_header_text(name, raw)):
            try:
                found.append(parse_mailbox(bare))
            except InvalidAddress as exc:
                fail(f"send: {name.title()}: invalid address {item!r}: {exc.reason}")
    return found


def _argument_address(value: str, what: str) -> str:
    """An address from the command line, checked; bytes that are not UTF-8 refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        fail(f"send: {what}: invalid address '{shown}': not valid UTF-8")
    try:
        return parse_mailbox(value)
    except InvalidAddress as exc:
        fail(f"send: {what}: {exc}")


def _envelope_sender(given: str | None, head: bytes) -> str:
    """``-f``, else the first ``From`` address, else ``USER@HOST``; checked."""
    if given is not None:
        return _argument_address(given, "-f")
    senders = _header_addresses(head, ("from",))
    return senders[0] if senders else _default_sender()


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
@click.option(
    "--priority",
    metavar="CLASS",
    help="urgent, normal (the default) or bulk: urgent mail is sent first, bulk last.",
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
    priority: str | None,
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
    try:
        cls = parse_priority(priority)
    except ValueError as exc:
        fail(f"send: --priority: {exc}", EXIT_USAGE)
    loaded = settings(ctx, kw)
    if sendmail_option:
        log.debug("sendmail options ignored: %s", " ".join(f"-o{o}" for o in sendmail_option))
    stdin = getattr(sys.stdin, "buffer", None)
    data = stdin.read() if stdin is not None else b""
    if not data.strip():
        fail("send: no message on standard input")
    head, rest = _split_message(data)
    rcpts = [_argument_address(r, "recipient") for r in recipients]
    if read_recipients:
        rcpts += _header_addresses(head, ("to", "cc", "bcc"))
        head = _drop_header(head, b"bcc")
    if not rcpts:
        fail("send: no recipients; give addresses or use -t", EXIT_USAGE)
    has_from = any(name == "from" for name, _ in _header_fields(head))
    sender = _envelope_sender(sender, head)
    if not has_from:
        nl = b"\r\n" if head.endswith(b"\r\n") or b"\r\n" in rest[:2] else b"\n"
        head = f"From: {sender}".encode() + nl + head
    try:
        prepared = dataclasses.replace(prepare(sender, rcpts, head + rest), priority=cls)
    except (InvalidAddress, InvalidMessage) as exc:
        fail(f"send: {exc}")
    _enqueue(open_spool(loaded, create=True), prepared)
    message_id = prepared.message_id
    log.info("queued <%s> for %s", message_id, ", ".join(rcpts))
    return EXIT_OK


def _enqueue(spool: QueueBackend, prepared: Prepared) -> None:
    """Queue ``prepared`` durably, or stop the command saying what became of it.

    What a committed QueuedMailDelivery does, without its transaction: the
    data manager must swallow a failure after the commit (tpc_finish never
    fails) -- here it is reported, and the exit code says the mail is not
    in the queue.
    """
    try:
        staged = spool.stage(prepared)
    except (SpoolError, OSError) as exc:  # nothing left behind
        fail(f"send: not queued: {reason(exc)}")
    try:
        spool.publish([staged])
    except (SpoolError, OSError) as exc:
        tmp = getattr(staged, "tmp_path", None)  # a spool's file; a database rolls back
        if tmp is None or os.path.lexists(tmp):  # not made visible: take it back
            spool.discard([staged])
            fail(f"send: not queued: {reason(exc)}")
        fail(f"send: queued as {staged.id}, but possibly not durably: {reason(exc)}")


#: The verbs of this module, for :mod:`mailspool.cli.main` to register.
COMMANDS: tuple[click.Command, ...] = (run, drain, send)
