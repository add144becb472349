"""A local SMTP sink for development: ``mailspool devserver``.

Why it exists: a developer (and ``mailspool demo``) should be able to run the
whole path -- commit, spool, processor, relay -- on a laptop without a real
mail server.  :class:`DevServer` accepts every message on a loopback port,
prints a line about each, keeps the last ones in memory and, when given a
Maildir, stores each message there (a file any mail reader can open).

It is written with the standard library only (``socketserver`` and a thread
per connection) so that it runs wherever mailspool is installed.  It speaks
enough ESMTP for any client: EHLO/HELO, MAIL, RCPT, DATA with dot-unstuffing,
RSET, NOOP, QUIT, PIPELINING, 8BITMIME, SMTPUTF8, SIZE, and AUTH PLAIN/LOGIN
that accepts any credentials (never printed).  There is no TLS: it is not a
relay to expose to a network, and it binds to 127.0.0.1 by default.
"""

from __future__ import annotations

import base64
import binascii
import collections
import email.parser
import email.policy
import errno
import logging
import mailbox
import os
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import IO

__all__ = ["DEFAULT_PORT", "DevServer", "Received", "make_maildir"]

log = logging.getLogger(__name__)

#: The port ``mailspool devserver`` listens on unless told otherwise.
DEFAULT_PORT = 8025
_MAX_LINE = 4096
_MAX_RECIPIENTS = 1000
_IDLE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Received:
    """One message the sink accepted.

    Attributes:
        sender: the envelope sender (``""`` for the null sender).
        recipients: the envelope recipients.
        data: the message as received, CRLF line endings, dots unstuffed.
        peer: the client's address.
        path: the file it was stored in, when a Maildir was given.
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    peer: str
    path: str | None = None

    @property
    def subject(self) -> str:
        """The decoded Subject header, or ``""``."""
        return str(self._headers().get("Subject", "") or "")

    @property
    def message_id(self) -> str:
        """The Message-Id without angle brackets, or ``""``."""
        return str(self._headers().get("Message-Id", "") or "").strip().strip("<>")

    def _headers(self) -> email.message.Message:
        parser = email.parser.BytesHeaderParser(policy=email.policy.default)
        return parser.parsebytes(self.data)


class _Session(socketserver.StreamRequestHandler):
    """One SMTP conversation.  ``self.server`` is a :class:`_TCPServer`."""

    server: _TCPServer
    timeout = _IDLE_TIMEOUT

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode("utf-8") + b"\r\n")

    def readline(self) -> bytes | None:
        line = self.rfile.readline(_MAX_LINE + 1)
        if not line:
            return None
        if len(line) > _MAX_LINE and not line.endswith(b"\n"):
            # Swallow the rest of the over-long line.
            while line and not line.endswith(b"\n"):
                line = self.rfile.readline(_MAX_LINE)
            return b""
        return line.rstrip(b"\r\n")

    def handle(self) -> None:
        self.sink = self.server.sink
        self.peer = f"{self.client_address[0]}:{self.client_address[1]}"
        self.greeted = False
        self.sender: str | None = None
        self.recipients: list[str] = []
        self.reply(f"220 {self.sink.hostname} ESMTP mailspool devserver")
        try:
            while True:
                raw = self.readline()
                if raw is None:
                    return
                verb, _, arg = raw.decode("utf-8", "surrogateescape").partition(" ")
                if not self.command(verb.upper(), arg):
                    return
        except (OSError, TimeoutError):
            log.debug("devserver: connection from %s lost", self.peer, exc_info=True)

    def command(self, verb: str, arg: str) -> bool:
        """Answer one command (see :data:`_VERBS`); False when the conversation ends."""
        answer = _VERBS.get(verb)
        if not self.greeted and (answer is None or verb in _AFTER_EHLO):
            self.reply("503 5.5.1 Say EHLO first")
            return True
        if answer is None:
            self.reply("500 5.5.2 Command not recognized")
            return True
        return answer(self, arg)

    # -- the verbs: each answers and says whether the conversation goes on ------------

    def ehlo(self, arg: str) -> bool:
        self.greeted, self.sender, self.recipients = True, None, []
        for ext in (
            f"{self.sink.hostname} greets {arg or 'you'}",
            "PIPELINING",
            "8BITMIME",
            "SMTPUTF8",
            f"SIZE {self.sink.max_size}",
            "AUTH PLAIN LOGIN",
            "ENHANCEDSTATUSCODES",
        ):
            self.wfile.write(f"250-{ext}\r\n".encode())
        self.reply("250 HELP")
        return True

    def helo(self, arg: str) -> bool:
        self.greeted, self.sender, self.recipients = True, None, []
        self.reply(f"250 {self.sink.hostname}")
        return True

    def noop(self, arg: str) -> bool:
        self.reply("250 2.0.0 OK")
        return True

    def rset(self, arg: str) -> bool:
        self.sender, self.recipients = None, []
        self.reply("250 2.0.0 OK")
        return True

    def quit(self, arg: str) -> bool:
        self.reply("221 2.0.0 Bye")
        return False

    def vrfy(self, arg: str) -> bool:
        self.reply("252 2.0.0 Cannot verify, will accept")
        return True

    def mail(self, arg: str) -> bool:
        m = re.match(r"FROM:\s*<([^>]*)>", arg, re.IGNORECASE)
        if self.sender is not None:
            self.reply("503 5.5.1 Nested MAIL command")
        elif m is None:
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        else:
            self.sender, self.recipients = m.group(1), []
            self.reply("250 2.1.0 OK")
        return True

    def rcpt(self, arg: str) -> bool:
        m = re.match(r"TO:\s*<([^>]+)>", arg, re.IGNORECASE)
        if self.sender is None:
            self.reply("503 5.5.1 Need MAIL first")
        elif m is None:
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
        elif len(self.recipients) >= _MAX_RECIPIENTS:
            self.reply("452 4.5.3 Too many recipients")
        else:
            self.recipients.append(m.group(1))
            self.reply("250 2.1.5 OK")
        return True

    def data(self, arg: str) -> bool:
        if self.sender is None or not self.recipients:
            self.reply("503 5.5.1 Need MAIL and RCPT first")
            return True
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        got_data = self.read_data()
        if got_data is None:
            return False
        data, too_big = got_data
        if too_big:
            self.reply("552 5.3.4 Message too big")
        else:
            got = self.sink.deliver(self.sender, tuple(self.recipients), data, self.peer)
            name = os.path.basename(got.path) if got.path else "memory"
            self.reply(f"250 2.0.0 OK stored as {name}")
        self.sender, self.recipients = None, []
        return True

    def read_data(self) -> tuple[bytes, bool] | None:
        """The message up to the final dot, unstuffed, and whether it was too big.

        Returns None when the client went away first.
        """
        chunks: list[bytes] = []
        size = 0
        limit = self.server.sink.max_size
        at_start = True  # an over-long line comes in pieces: only a line's start counts
        while True:
            line = self.rfile.readline(_MAX_LINE + 1)
            if not line:
                return None
            if at_start:
                if line in (b".\r\n", b".\n"):
                    return b"".join(chunks), size > limit
                if line.startswith(b"."):
                    line = line[1:]
            at_start = line.endswith(b"\n")
            size += len(line)
            if size <= limit:
                chunks.append(line)
            else:
                chunks = []  # read on to the end, keep nothing: the reply is 552

    def auth(self, arg: str) -> bool:
        """AUTH PLAIN or LOGIN: any credentials are accepted, never printed."""
        self._auth(arg)
        return True

    def _auth(self, arg: str) -> None:
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        try:
            if mech == "PLAIN":
                if not initial:
                    self.reply("334 ")
                    initial = (self.readline() or b"").decode("ascii")
                base64.b64decode(initial, validate=True)
            elif mech == "LOGIN":
                if not initial:
                    self.reply("334 VXNlcm5hbWU6")
                    initial = (self.readline() or b"").decode("ascii")
                base64.b64decode(initial, validate=True)
                self.reply("334 UGFzc3dvcmQ6")
                base64.b64decode((self.readline() or b"").decode("ascii"), validate=True)
            else:
                self.reply("504 5.5.4 Unrecognized authentication type")
                return
        except (binascii.Error, UnicodeDecodeError):
            self.reply("501 5.5.2 Cannot decode response")
            return
        self.reply("235 2.7.0 Authentication successful (any credentials are)")


#: The commands the sink answers, by verb.
_VERBS: dict[str, Callable[[_Session, str], bool]] = {
    "EHLO": _Session.ehlo,
    "HELO": _Session.helo,
    "NOOP": _Session.noop,
    "RSET": _Session.rset,
    "QUIT": _Session.quit,
    "VRFY": _Session.vrfy,
    "AUTH": _Session.auth,
    "MAIL": _Session.mail,
    "RCPT": _Session.rcpt,
    "DATA": _Session.data,
}
#: Refused (503) before EHLO or HELO, as is then any verb not in the table.
_AFTER_EHLO = frozenset({"MAIL", "RCPT", "DATA"})


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], sink: DevServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.sink = sink
        super().__init__(address, _Session)


def make_maildir(path: str) -> None:
    """Make ``path`` a Maildir (``tmp/``, ``new/``, ``cur/``) if it is not one yet.

    Raises:
        OSError: naming the path: it (or one of its subdirectories) is a
            file, or cannot be created.
    """
    for sub in ("", "tmp", "new", "cur"):
        where = os.path.join(path, sub) if sub else path
        if os.path.exists(where) and not os.path.isdir(where):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", where)
        os.makedirs(where, mode=0o700, exist_ok=True)


class DevServer:
    """An SMTP sink on a local port that accepts everything.

    Args:
        host: the address to listen on (default: loopback only).
        port: the port; 0 picks a free one (see :attr:`port`).
        maildir: a directory to store each message in as a Maildir
            (created if missing); ``None`` keeps messages in memory only.
        echo: where to print one line per message (``None``: silent).
        echo_body: print the whole message too, not only a summary.
        keep: how many received messages :attr:`received` remembers.
        max_size: the largest message accepted (advertised as SIZE).

    Use as a context manager, or call :meth:`start` and :meth:`stop`; it
    serves from a background thread.

    Raises:
        OSError: from the constructor when the address cannot be bound, or
            the Maildir cannot be made (see :func:`make_maildir`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        maildir: str | os.PathLike[str] | None = None,
        echo: IO[str] | None = None,
        echo_body: bool = False,
        keep: int = 1000,
        max_size: int = 50 * 1024 * 1024,
    ) -> None:
        self.hostname = socket.gethostname() or "localhost"
        self.max_size = max_size
        self.echo = echo
        self.echo_body = echo_body
        self.maildir = os.fspath(maildir) if maildir is not None else None
        if self.maildir is not None:
            make_maildir(self.maildir)
        self._box = mailbox.Maildir(self.maildir, create=True) if self.maildir else None
        self._lock = threading.Condition()
        self._received: collections.deque[Received] = collections.deque(maxlen=keep)
        self._count = 0
        self._listeners: list[Callable[[Received], None]] = []
        self._server = _TCPServer((host, port), self)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """The address the sink listens on."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The port the sink listens on (the real one when 0 was asked)."""
        return int(self._server.server_address[1])

    @property
    def received(self) -> list[Received]:
        """The messages received so far (the last ``keep`` of them)."""
        with self._lock:
            return list(self._received)

    @property
    def count(self) -> int:
        """How many messages were received in all."""
        with self._lock:
            return self._count

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` messages in all were received.

        Returns:
            True if they were, False if ``timeout`` seconds passed first.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def deliver(self, sender: str, recipients: tuple[str, ...], data: bytes, peer: str) -> Received:
        """Record one message (called by the SMTP session after DATA)."""
        path = None
        if self._box is not None:
            trace = f"Return-Path: <{sender}>\n".encode("utf-8", "surrogateescape")
            for rcpt in recipients:
                trace += f"Delivered-To: {rcpt}\n".encode("utf-8", "surrogateescape")
            with self._lock:
                key = self._box.add(trace + data.replace(b"\r\n", b"\n"))
            assert self.maildir is not None
            path = os.path.join(self.maildir, "new", key)
        got = Received(sender, recipients, data, peer, path)
        with self._lock:
            self._received.append(got)
            self._count += 1
            self._lock.notify_all()
        if self.echo is not None:
            self._print(got)
        return got

    def _print(self, got: Received) -> None:
        assert self.echo is not None
        where = f" -> {got.path}" if got.path else ""
        try:
            subject = got.subject
        except Exception:  # a header the parser cannot decode; still show the rest
            subject = "?"
        line = (
            f"{time.strftime('%H:%M:%S')} from <{got.sender}> to "
            f"{', '.join(got.recipients)}: {subject!r} ({len(got.data)} bytes){where}"
        )
        with self._lock:
            print(line, file=self.echo, flush=True)
            if self.echo_body:
                text = got.data.decode("utf-8", "replace").replace("\r\n", "\n")
                print(text.rstrip("\n") + "\n", file=self.echo, flush=True)

    def start(self) -> DevServer:
        """Serve in a background (daemon) thread; returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"mailspool-devserver-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
