"""The session's socket: timeouts per phase, data in blocks, replies line by line.

What :class:`~mailspool.smtp.session.SMTPConnection` does with the socket
itself, below the SMTP protocol: a timeout set only when it changes, the
message data written in blocks (each under the command timeout, so a large
message on a slow link is not cut off by one total deadline), a reply read
line by line into the sans-IO :class:`~mailspool.smtp.protocol.ReplyReader`,
and whether a relay spoke (or closed) while the session sat idle.
Errors are the socket's own; the session classifies them.
"""

from __future__ import annotations

import select
import smtplib
import socket
import ssl
from typing import Any

from mailspool.smtp.esmtp import dot_stuff
from mailspool.smtp.protocol import MAX_LINE, ReplyReader
from mailspool.smtp.result import Reply

__all__ = ["BLOCK", "Poller", "read_reply", "set_timeout", "write_data"]

#: Message data is written in blocks of this many octets, each with the
#: command timeout (socket.sendall's timeout covers the whole call).
BLOCK = 256 * 1024


def set_timeout(sock: socket.socket, timeout: float | None) -> None:
    """Set the socket's timeout, unless it already is that.

    Each ``settimeout()`` is a system call that lets go of the interpreter
    lock; a message would otherwise make three of them.
    """
    if sock.gettimeout() != timeout:
        sock.settimeout(timeout)


def write_data(smtp: smtplib.SMTP, data: bytes) -> None:
    """Write the message, dot-stuffed, and its final dot, in blocks."""
    if len(data) < BLOCK:  # the usual case: one write
        smtp.send(dot_stuff(data))
        return
    payload = memoryview(dot_stuff(data))
    for start in range(0, len(payload), BLOCK):
        smtp.send(payload[start : start + BLOCK])


def read_reply(smtp: smtplib.SMTP, reader: ReplyReader) -> Reply:
    """Read lines until ``reader`` has a whole reply.

    Raises:
        OSError: the socket failed, timed out, or the relay closed it.
        ProtocolViolation: the relay sent something that is not a reply.
    """
    if smtp.file is None:
        smtp.file = smtp.sock.makefile("rb")  # type: ignore[union-attr]
    while True:
        line = smtp.file.readline(MAX_LINE + 1)
        if not line:
            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
        replies = reader.feed(line)
        if replies:
            return replies[0]


class Poller:
    """Whether a socket is readable, with one ``poll`` object per socket."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._poll: Any = None

    def readable(self, sock: socket.socket) -> bool:
        """True when the peer sent something (or closed) while we expected silence."""
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            if not hasattr(select, "poll"):
                ready, _, _ = select.select([sock], [], [], 0)
                return bool(ready)
            if sock is not self._sock:
                self._poll = select.poll()
                self._poll.register(sock, select.POLLIN | select.POLLPRI)
                self._sock = sock
            return bool(self._poll.poll(0))
        except (OSError, ValueError):
            return True
