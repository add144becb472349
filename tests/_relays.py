"""Relay behaviours, spool filling and child processes for the processor tests.

The handlers plug into the ``smtp_relay`` factory of ``conftest.py`` (real
aiosmtpd relays on 127.0.0.1).  :class:`MidDataDropper` is a tiny SMTP
server of its own, for the one fault aiosmtpd cannot produce: a connection
cut while the message data is still arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from _fs import fill
from mailspool.maildir.spool import RecipientStatus, Record, Spool, encode_file
from mailspool.message import Envelope, prepare
from mailspool.priority import Priority
from mailspool.smtp.mailer import Reply, SendResult

SENDER = "app@example.org"
RCPT = "jane@example.org"

_MSGID = re.compile(rb"^Message-I[dD]:\s*<([^>]+)>", re.MULTILINE | re.IGNORECASE)


class PerRecipient:
    """Answers RCPT from a table: address -> reply (default 250); ``replies``
    can change during a test."""

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = replies

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"


def message_id(content: bytes) -> str:
    """The Message-Id (without brackets) of a message as the relay received it."""
    m = _MSGID.search(content)
    assert m is not None, content[:200]
    return m.group(1).decode()


def body(n: int = 0, size: int = 0) -> bytes:
    """A small message; ``size`` adds that many bytes of body."""
    line = b"x" * 76 + b"\r\n"
    extra = line * (size // len(line) + 1) if size else b""
    return b"Subject: test %d\r\nFrom: %s\r\n\r\nbody %d\r\n" % (n, SENDER.encode(), n) + extra


def enqueue(
    spool: Spool,
    count: int = 1,
    *,
    to: Sequence[str] = (RCPT,),
    size: int = 0,
    not_before: float | None = None,
    batch: int = 100,
    priority: Priority = Priority.NORMAL,
) -> list[str]:
    """Commit ``count`` messages the way a delivery does; return their Message-Ids."""
    ids: list[str] = []
    for start in range(0, count, batch):
        staged = []
        for n in range(start, min(count, start + batch)):
            p = replace(prepare(SENDER, list(to), body(n, size)), priority=priority)
            staged.append(spool.stage(p, not_before=not_before))
            ids.append(p.message_id)
        spool.publish(staged)
    return ids


def fill_fast(spool: Spool, count: int) -> None:
    """Write ``count`` messages straight into new/ without fsync (a big queue, quickly)."""
    now = time.time()
    new = os.path.join(spool.path, "new")
    for n in range(count):
        p = prepare(SENDER, [RCPT], body(n))
        record = Record(SENDER, (RecipientStatus(RCPT),), now, message_id=p.message_id)
        head, data = encode_file(record, p.data)
        with open(os.path.join(new, f"{now:.0f}.fill{n}.test"), "wb") as f:
            f.write(head + data)


def only_id(spool: Spool) -> str:
    """The spool id of the one message in the spool."""
    entries = list(spool.entries())
    assert len(entries) == 1, entries
    return entries[0].id


# --- relay handlers (aiosmtpd hooks) ------------------------------------------------


def _accept(envelope: Any, address: str) -> str:
    envelope.rcpt_tos.append(address)
    return "250 2.1.5 OK"


def accept_mail(envelope: Any, address: str, options: list[str]) -> str:
    """What aiosmtpd does with an accepted ``MAIL``, for a ``handle_MAIL`` hook."""
    envelope.mail_from = address
    envelope.mail_options.extend(options)
    return "250 2.1.0 OK"


class RefuseSender:
    """Refuses ``MAIL`` from the given senders with 550 5.7.1, accepts the others."""

    def __init__(self, bad: Iterable[str]) -> None:
        self.bad_senders = set(bad)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.bad_senders:
            return "550 5.7.1 sender rejected"
        return accept_mail(envelope, address, options)


class Greylist:
    """Every recipient is refused with 450 the first time it is seen, then accepted."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address not in self.seen:
            self.seen.add(address)
            return "450 4.2.0 greylisted, try again later"
        return _accept(envelope, address)


class RefuseSome:
    """Refuses the given recipients with 550 5.1.1, accepts the others."""

    def __init__(self, bad: Iterable[str]) -> None:
        self.bad = set(bad)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.bad:
            return "550 5.1.1 no such user here"
        return _accept(envelope, address)


class RcptOnce:
    """Answers the first RCPT with ``reply``, then accepts everything."""

    def __init__(self, reply: str) -> None:
        self.reply: str | None = reply

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply, self.reply = self.reply, None
        return reply if reply is not None else _accept(envelope, address)


class DataReply:
    """Answers every message's data with ``reply`` (e.g. a 451, forever)."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return self.reply


class DropAfter250:
    """Takes the message (250), then closes the connection; ``closed`` is set then."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        def close() -> None:
            server.transport.close()
            self.closed.set()

        asyncio.get_running_loop().call_later(0.05, close)
        return "250 2.0.0 queued, bye"


class Switchable:
    """Answers EHLO with 421 while ``down`` is true: a relay out of service."""

    def __init__(self) -> None:
        self.down = True

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return ["421 4.3.2 service not available, closing"] if self.down else responses


class SlowData:
    """Takes ``delay`` seconds to answer each message's data; ``started`` is set at the first."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.started = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.started.set()
        await asyncio.sleep(self.delay)
        return "250 2.0.0 OK"


class TooManyConnections:
    """Answers EHLO with 421 while ``limit`` other sessions are open, as providers do.

    Until the first such refusal, the data of each message is held (up to
    ``hold`` seconds), so that the sessions already open are surely busy
    when the next connection arrives: a processor with more connections
    than ``limit`` meets the 421 at once.  ``refused`` counts the refusals,
    ``most`` the largest number of sessions open at once.
    """

    def __init__(self, limit: int, hold: float = 10.0) -> None:
        self.limit = limit
        self.hold = hold
        self.refused = 0
        self.most = 0
        self._sessions: list[Any] = []
        self._crowded: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._crowded is None:
            self._crowded = asyncio.Event()
        return self._crowded

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        live = [s for s in self._sessions if s.transport is not None]
        if len(live) >= self.limit:
            self.refused += 1
            self._event().set()
            return ["421 4.7.0 too many connections from your host"]
        self._sessions = [*live, server]
        self.most = max(self.most, len(self._sessions))
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.refused:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event().wait(), self.hold)
        return "250 2.0.0 OK"


# --- a relay that cuts the connection in the middle of the data -----------------------


class _MiniSMTP(socketserver.StreamRequestHandler):
    server: MidDataDropper

    def _reply(self, line: bytes) -> None:
        self.wfile.write(line + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self._reply(b"220 mini.test ESMTP")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                self._reply(b"250-mini.test\r\n250 8BITMIME")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                self._reply(b"250 OK")
            elif verb == b"DATA":
                self._reply(b"354 go ahead")
                if self.server.take_drop():
                    self.rfile.read(4096)  # some of the data, then a reset
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.connection.close()
                    return
                while self.rfile.readline() not in (b".\r\n", b""):
                    pass
                self.server.received += 1
                self._reply(b"250 2.0.0 OK")
            elif verb == b"QUIT":
                self._reply(b"221 bye")
                return
            else:
                self._reply(b"500 what?")


class MidDataDropper(socketserver.ThreadingTCPServer):
    """Speaks just enough SMTP; the first ``drops`` sessions are reset mid-data."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, drops: int) -> None:
        super().__init__(("127.0.0.1", 0), _MiniSMTP)
        self.drops = drops
        self.received = 0
        self._lock = threading.Lock()
        self.port: int = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def take_drop(self) -> bool:
        with self._lock:
            if self.drops > 0:
                self.drops -= 1
                return True
            return False

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# --- a mailer that only counts (for the memory test) ----------------------------------


class CountingSink:
    """A mailer whose connections accept everything and keep nothing but a count."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def connect(self) -> CountingSink:
        return self

    @property
    def alive(self) -> bool:
        return True

    def send(self, envelope: Envelope, data: bytes) -> SendResult:
        with self._lock:
            self.count += 1
        return SendResult(envelope.recipients, {}, Reply(250, "2.0.0 OK"))

    def close(self) -> None:
        pass


# --- processor processes ------------------------------------------------------------

CHILD = """
import logging, sys
from mailspool.smtp.mailer import SMTPMailer
from mailspool.processor.loop import QueueProcessor
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(process)d %(levelname)s %(message)s")
spool, port, connections, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
mailer = SMTPMailer("127.0.0.1", port, tls="none", connect_timeout=10, timeout=10,
                    data_timeout=10, local_hostname="child.test")
processor = QueueProcessor(spool, mailer, connections=connections, interval=30.0)
if mode == "drain":
    s = processor.drain()
    processor.stop()
    print(s.sent, s.deferred, s.failed, s.quarantined, flush=True)
else:
    processor.run()
    print("returned", flush=True)
"""


def start_child(spool: Spool, port: int, *, connections: int, mode: str) -> subprocess.Popen[str]:
    """A processor in its own process: ``mode`` is ``"drain"`` or ``"run"``."""
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, spool.path, str(port), str(connections), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.01)
    return True


class FillDiskThenAccept:
    """Accepts ``now`` at once and ``later`` from the second time on; fills
    ``disk`` before its first 250 after the data (the spool runs full just
    as the relay takes the message)."""

    def __init__(self, disk: Path) -> None:
        self.disk = disk
        self.rcpts = 0
        self.filled = False

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.rcpts += 1
        if address.startswith("later@") and self.rcpts <= 2:
            return "450 4.2.0 greylisted"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.filled:
            self.filled = True
            fill(self.disk)
        return "250 2.0.0 OK"
