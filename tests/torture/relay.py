"""A relay that fails in every way an SMTP relay can, and keeps a journal.

Why a relay of its own: the faults that matter for duplicates and losses sit
at exact points of the SMTP conversation (the connection dropped before the
greeting, at MAIL, at RCPT, while the data arrives, after the final dot but
before the reply, after the 250; a reply that never comes), and aiosmtpd
offers no hook at several of them.  This one speaks just enough ESMTP for
:class:`mailspool.SMTPMailer` (EHLO, MAIL, RCPT, DATA with dot-unstuffing,
RSET, NOOP, QUIT; it offers PIPELINING, which reading one line at a time
handles as it comes) with the standard library, one thread per connection.

The journal is the judge of the run.  Every message the relay takes is
written there (and fsynced) *before* the reply that could tell the client
so, with the recipients, the Message-Id, the EHLO name of the sending
process, the connection and the fault injected, if any; so is every
permanent refusal of a recipient.  A line is also written for every fault
injected and for every MAIL command (the client is done with the message
before the previous one by then: with PIPELINING it may send the next
MAIL with a message's final dot).

Faults are chosen at random (seeded) per connection, per transaction and
per recipient; recipients whose local part contains ``.bounce`` are always
refused with 550 (the "expected to fail" ones).  SIGUSR1 makes the relay
calm: from then on only those are refused.  SIGTERM stops it.

Run as ``python -m tests.torture.relay --journal FILE --seed N``; it prints
its port on the first line of its standard output once it listens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "CONNECTION_FAULTS",
    "RCPT_FAULTS",
    "TRANSACTION_FAULTS",
    "Relay",
    "body_sum",
    "check_message",
    "main",
]

#: Faults chosen when a connection is accepted: name -> weight (out of 1000).
CONNECTION_FAULTS: dict[str, int] = {
    "drop-before-greeting": 10,
    "421-greeting": 5,
    "stall-greeting": 3,
}
#: Faults chosen per transaction (at MAIL): name -> weight (out of 1000).
TRANSACTION_FAULTS: dict[str, int] = {
    "drop-at-mail": 15,
    "451-at-mail": 15,
    "421-at-mail": 5,
    "stall-at-mail": 4,
    "drop-at-rcpt": 15,
    "stall-at-rcpt": 4,
    "drop-at-data": 10,
    "drop-mid-data": 20,
    "451-after-dot": 20,
    "554-after-dot": 10,
    "drop-after-dot-not-taken": 15,
    "drop-after-dot-taken": 15,
    "stall-after-dot-taken": 5,
    "drop-after-250": 15,
}
#: Faults chosen per recipient: name -> weight (out of 1000).
RCPT_FAULTS: dict[str, int] = {
    "450-rcpt": 40,
    "550-rcpt": 10,
}

_MSGID = re.compile(rb"^Message-Id:[ \t]*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)
_SUM = re.compile(rb"^X-Torture-Sum:[ \t]*([0-9a-f]{64})", re.IGNORECASE | re.MULTILINE)
_ADDR = re.compile(r"(?:FROM|TO):\s*<([^>]*)>", re.IGNORECASE)


def body_sum(body: bytes) -> str:
    """The checksum a writer puts in ``X-Torture-Sum`` for ``body``."""
    return hashlib.sha256(body).hexdigest()


def check_message(data: bytes) -> tuple[str | None, bool]:
    """The Message-Id of ``data`` and whether its body matches its checksum."""
    head, sep, body = data.partition(b"\r\n\r\n")
    m = _MSGID.search(head)
    mid = m.group(1).decode("ascii", "replace") if m else None
    s = _SUM.search(head)
    intact = bool(sep) and s is not None and s.group(1).decode() == body_sum(body)
    return mid, intact


class _Drop(Exception):
    """End the session now (the fault says so)."""


class _Session(socketserver.StreamRequestHandler):
    server: Relay

    def setup(self) -> None:
        super().setup()
        self.request.settimeout(60.0)
        self.name = "?"
        self.session = self.server.new_session()

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode("ascii") + b"\r\n")
        self.wfile.flush()

    def reset_hard(self) -> None:
        """Close with a TCP reset (unread data would make the kernel send one anyway)."""
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raise _Drop()

    def stall(self) -> None:
        time.sleep(self.server.stall)

    def handle(self) -> None:
        srv = self.server
        try:
            fault = srv.choose(CONNECTION_FAULTS)
            if fault is not None:
                srv.fault(fault, self.name)
                if fault == "drop-before-greeting":
                    raise _Drop()
                if fault == "421-greeting":
                    self.reply("421 4.3.2 torture relay: not now")
                    raise _Drop()
                self.stall()
            self.reply("220 torture.test ESMTP")
            self.conversation()
        except (_Drop, OSError, TimeoutError):
            pass

    def conversation(self) -> None:
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.plan: str | None = None
        while True:
            raw = self.rfile.readline(4096)
            if not raw:
                return
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "QUIT":
                self.reply("221 2.0.0 bye")
                return
            answer = _VERBS.get(verb)
            if answer is None:
                self.reply("500 5.5.2 what?")
            else:
                answer(self, verb, arg)

    def on_hello(self, verb: str, arg: str) -> None:
        self.name = arg.strip() or "?"
        self.sender, self.rcpts = None, []
        if verb == "EHLO":
            self.wfile.write(b"250-torture.test\r\n250-8BITMIME\r\n250-PIPELINING\r\n")
            self.reply("250 ENHANCEDSTATUSCODES")
        else:
            self.reply("250 torture.test")

    def on_noop(self, verb: str, arg: str) -> None:
        if verb == "RSET":
            self.sender, self.rcpts = None, []
        self.reply("250 2.0.0 OK")

    def on_mail(self, verb: str, arg: str) -> None:
        # With PIPELINING a client may send MAIL with the previous
        # message's final dot, before it has settled that message;
        # the MAIL after that one comes only once it has: the
        # judge's proof that a kill came too late to explain a copy.
        srv = self.server
        srv.record({"e": "mail", "sess": self.session}, sync=False)
        plan = self.plan = srv.choose(TRANSACTION_FAULTS)
        if plan is not None:
            srv.fault(plan, self.name)
        m = _ADDR.match(arg)
        if plan == "drop-at-mail":
            raise _Drop()
        if plan == "421-at-mail":
            self.reply("421 4.3.2 torture relay: closing")
            raise _Drop()
        if plan == "stall-at-mail":
            self.stall()
        if plan == "451-at-mail":
            self.reply("451 4.3.0 torture relay: try later")
        elif m is None:
            self.reply("501 5.5.4 syntax")
        else:
            self.sender, self.rcpts = m.group(1), []
            self.reply("250 2.1.0 OK")

    def on_rcpt(self, verb: str, arg: str) -> None:
        m = _ADDR.match(arg)
        if self.sender is None or m is None:
            self.reply("503 5.5.1 MAIL first")
            return
        if self.plan == "drop-at-rcpt":
            raise _Drop()
        if self.plan == "stall-at-rcpt":
            self.plan = None
            self.stall()
        self.reply(self.rcpt(m.group(1), self.rcpts))

    def on_data(self, verb: str, arg: str) -> None:
        if self.sender is None or not self.rcpts:
            self.reply("503 5.5.1 RCPT first")
            return
        if self.plan == "drop-at-data":
            raise _Drop()
        self.reply("354 go ahead")
        self.data(self.rcpts, self.plan)
        self.sender, self.rcpts, self.plan = None, [], None

    def rcpt(self, addr: str, rcpts: list[str]) -> str:
        srv = self.server
        local = addr.partition("@")[0]
        if ".bounce" in local:
            srv.record({"e": "refuse5", "rcpt": addr, "by": self.name, "why": "bounce"})
            return "550 5.1.1 torture relay: no such user (expected)"
        fault = srv.choose(RCPT_FAULTS)
        if fault is not None:
            srv.fault(fault, self.name)
        if fault == "450-rcpt":
            return "450 4.2.0 torture relay: greylisted"
        if fault == "550-rcpt":
            srv.record({"e": "refuse5", "rcpt": addr, "by": self.name, "why": "550-rcpt"})
            return "550 5.7.1 torture relay: refused at random"
        rcpts.append(addr)
        return "250 2.1.5 OK"

    def data(self, rcpts: Sequence[str], plan: str | None) -> None:
        srv = self.server
        chunks: list[bytes] = []
        lines = 0
        while True:
            line = self.rfile.readline(65536)
            if not line:
                raise _Drop()
            if line == b".\r\n":
                break
            lines += 1
            if plan == "drop-mid-data" and lines == 3:
                self.reset_hard()
            chunks.append(line[1:] if line.startswith(b".") else line)
        mid, intact = check_message(b"".join(chunks))
        event: dict[str, Any] = {
            "e": "accept",
            "mid": mid,
            "rcpts": list(rcpts),
            "by": self.name,
            "sess": self.session,
            "fault": plan,
            "intact": intact,
        }
        if plan == "451-after-dot":
            self.reply("451 4.3.0 torture relay: not taken")
        elif plan == "554-after-dot":
            for r in rcpts:
                srv.record({"e": "refuse5", "rcpt": r, "mid": mid, "by": self.name, "why": plan})
            self.reply("554 5.6.0 torture relay: content refused")
        elif plan == "drop-after-dot-not-taken":
            raise _Drop()
        elif plan == "drop-after-dot-taken":
            srv.record(event)
            raise _Drop()
        elif plan == "stall-after-dot-taken":
            srv.record(event)
            self.stall()
            self.reply("250 2.0.0 taken (late)")
        else:
            srv.record(event)
            self.reply("250 2.0.0 taken")
            if plan == "drop-after-250":
                raise _Drop()


#: The commands the relay answers (QUIT aside), by verb.
_VERBS: dict[str, Callable[[_Session, str, str], None]] = {
    "EHLO": _Session.on_hello,
    "HELO": _Session.on_hello,
    "NOOP": _Session.on_noop,
    "RSET": _Session.on_noop,
    "MAIL": _Session.on_mail,
    "RCPT": _Session.on_rcpt,
    "DATA": _Session.on_data,
}


class Relay(socketserver.ThreadingTCPServer):
    """The faulty relay: a threaded TCP server with a journal.

    Args:
        journal: the journal file (JSON lines, appended).
        seed: seeds the choice of faults.
        fault_rate: multiplies every fault weight (0 turns faults off).
        stall: seconds a stalled reply waits (longer than the client's timeouts).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, journal: str, *, seed: int, fault_rate: float, stall: float) -> None:
        super().__init__(("127.0.0.1", 0), _Session)
        self.port: int = self.server_address[1]
        self.fault_rate = fault_rate
        self.stall = stall
        self.calm = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sessions = 0
        self._journal = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def choose(self, table: dict[str, int]) -> str | None:
        """A fault from ``table`` (or None) by its weight, unless calm."""
        if self.calm or self.fault_rate <= 0:
            return None
        with self._lock:
            x = self._rng.random() * 1000.0 / self.fault_rate
        for name, weight in table.items():
            if x < weight:
                return name
            x -= weight
        return None

    def new_session(self) -> int:
        """A number for a new connection."""
        with self._lock:
            self._sessions += 1
            return self._sessions

    def record(self, event: dict[str, Any], *, sync: bool = True) -> None:
        """Append ``event`` to the journal; make it durable before going on if ``sync``."""
        event["t"] = time.monotonic()
        line = json.dumps(event, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            os.write(self._journal, line)
            if sync:
                os.fsync(self._journal)

    def fault(self, kind: str, by: str) -> None:
        self.record({"e": "fault", "kind": kind, "by": by}, sync=False)

    def close_journal(self) -> None:
        with self._lock:
            os.close(self._journal)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the relay until SIGTERM; print the port first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--journal", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=1.0)
    parser.add_argument("--stall", type=float, default=4.0)
    args = parser.parse_args(argv)
    relay = Relay(args.journal, seed=args.seed, fault_rate=args.fault_rate, stall=args.stall)
    stop = threading.Event()

    def calm(signum: int, frame: object) -> None:
        relay.calm = True

    signal.signal(signal.SIGUSR1, calm)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    thread = threading.Thread(target=relay.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    print(relay.port, flush=True)
    while not stop.wait(0.2):
        pass
    relay.shutdown()
    relay.server_close()
    thread.join()
    relay.close_journal()
    return 0


if __name__ == "__main__":
    sys.exit(main())
