"""The three systems behind one small interface, each through its public API.

* mailspool: ``QueuedMailDelivery`` to enqueue, ``QueueProcessor(spool,
  SMTPMailer(...), connections=N)`` to deliver (``drain()``, or ``start()``
  with ``on_commit=processor.wake`` for a running processor).
* zope.sendmail: its ``QueuedMailDelivery`` and ``QueueProcessorThread``
  (``run(forever=False)`` is one pass over the queue; ``start()`` polls every
  ``interval`` seconds, 3 s by default and in its console script).
* repoze.sendmail: its ``QueuedMailDelivery`` (which takes an
  ``email.message.Message`` only) and ``QueueProcessor.send_messages()``, one
  pass over the queue; repoze ships no polling loop (its ``qp`` script is
  one-shot, for cron), so a running processor is a thread calling it every
  3 s, the same interval as zope.sendmail's.

Everything here runs inside the child process of one trial.
"""

from __future__ import annotations

import email
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "MAILSPOOL",
    "PEERS",
    "REPOZE",
    "SYSTEMS",
    "ZOPE",
    "Runner",
    "make_messages",
    "pending",
]

MAILSPOOL = "mailspool"
ZOPE = "zope.sendmail"
REPOZE = "repoze.sendmail"
SYSTEMS = (MAILSPOOL, ZOPE, REPOZE)
PEERS = (ZOPE, REPOZE)

SENDER = "sender@bench.example"
POLL_INTERVAL = 3.0

_BODY_LINE = "The quick brown fox jumps over the lazy dog while the queue keeps counting. "


def make_messages(
    n: int, tag: str, size: int = 2048, start: int = 0
) -> list[tuple[str, list[str], bytes]]:
    """``n`` distinct messages of about ``size`` bytes, CRLF line endings.

    Returns:
        ``(sender, [recipient], data)`` triples; each has its own Message-Id
        (numbered from ``start``).
    """
    out = []
    for i in range(start, start + n):
        rcpt = f"rcpt{i % 100}@bench.example"
        head = (
            f"From: Bench Sender <{SENDER}>\r\n"
            f"To: {rcpt}\r\n"
            f"Subject: benchmark message {i} of run {tag}\r\n"
            "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
            f"Message-Id: <bench.{tag}.{i}@bench.example>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n"
        )
        body = []
        length = len(head)
        line = 0
        while length < size:
            text = f"{line:04d} {_BODY_LINE}"[:76] + "\r\n"
            body.append(text)
            length += len(text)
            line += 1
        out.append((SENDER, [rcpt], (head + "".join(body)).encode("ascii")))
    return out


def pending(system: str, path: str) -> int:
    """Messages still in the queue at ``path`` (ready, claimed or deferred)."""
    if system == MAILSPOOL:
        from mailspool.maildir.spool import Spool

        c = Spool(path, create=False).counts()
        return sum(c[k] for k in ("ready", "in_flight", "deferred", "failed", "held"))
    n = 0
    for sub in ("new", "cur"):
        d = os.path.join(path, sub)
        if os.path.isdir(d):
            n += sum(1 for name in os.listdir(d) if not name.startswith("."))
    return n


class Runner:
    """One system's delivery and processor, set up for one trial.

    Args:
        system: one of :data:`SYSTEMS`.
        path: the spool directory (fresh, under a temporary directory).
        port: the relay's port on 127.0.0.1.
        tls_ca: the CA file when the relay requires STARTTLS, else None.
        connections: mailspool's parallel SMTP connections (None: its default).
        interval: the processors' polling interval (seconds).
        wake: mailspool only: pass ``on_commit=processor.wake`` to the
            delivery (False: the processor finds new mail by itself, as a
            separate ``mailspool run`` process would).
    """

    def __init__(
        self,
        system: str,
        path: str,
        port: int,
        *,
        tls_ca: str | None = None,
        connections: int | None = None,
        interval: float = POLL_INTERVAL,
        wake: bool = True,
    ) -> None:
        self.system = system
        self.path = path
        self.port = port
        self.tls_ca = tls_ca
        self.connections = connections
        self.interval = interval
        self.wake = wake
        self._on_commit: Callable[[], None] | None = None
        self._stop_loop = threading.Event()
        self._thread: Any = None
        self._processor: Any = None
        self._delivery: Any = None

    # -- configuration ------------------------------------------------------

    def mailer(self) -> Any:
        host = "127.0.0.1"
        if self.system == MAILSPOOL:
            from mailspool import SMTPMailer

            if self.tls_ca:
                return SMTPMailer(host, self.port, tls="starttls", ca_file=self.tls_ca)
            return SMTPMailer(host, self.port, tls="none")
        if self.system == ZOPE:
            from zope.sendmail.mailer import SMTPMailer as ZMailer

            # force_tls: STARTTLS or refuse; zope.sendmail cannot verify the
            # certificate (smtplib's starttls() without a context).
            return ZMailer(host, self.port, force_tls=bool(self.tls_ca), no_tls=not self.tls_ca)
        from repoze.sendmail.mailer import SMTPMailer as RMailer

        return RMailer(host, self.port, force_tls=bool(self.tls_ca), no_tls=not self.tls_ca)

    def delivery(self) -> Any:
        if self._delivery is None:
            if self.system == MAILSPOOL:
                from mailspool import QueuedMailDelivery

                self._delivery = QueuedMailDelivery(self.path, on_commit=self._on_commit)
            elif self.system == ZOPE:
                from zope.sendmail.delivery import QueuedMailDelivery as ZDelivery

                self._ensure_maildir()
                self._delivery = ZDelivery(self.path)
            else:
                from repoze.sendmail.delivery import QueuedMailDelivery as RDelivery

                self._ensure_maildir()
                self._delivery = RDelivery(self.path)
        return self._delivery

    def _ensure_maildir(self) -> None:
        for sub in ("", "tmp", "new", "cur"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)

    def inputs(self, messages: Sequence[tuple[str, list[str], bytes]]) -> list[Any]:
        """What the application hands to ``send()``: bytes, or for repoze a Message."""
        if self.system == REPOZE:
            return [(f, t, email.message_from_bytes(d)) for f, t, d in messages]
        return list(messages)

    # -- enqueue ------------------------------------------------------------

    def enqueue(self, inputs: Sequence[Any], per_tx: int) -> None:
        """Send and commit ``inputs``, ``per_tx`` messages per transaction."""
        import transaction

        delivery = self.delivery()
        send = delivery.send
        manager = transaction.manager
        for start in range(0, len(inputs), per_tx):
            with manager:
                for fromaddr, toaddrs, message in inputs[start : start + per_tx]:
                    send(fromaddr, toaddrs, message)

    # -- one pass -----------------------------------------------------------

    def drain(self) -> dict[str, Any]:
        """Deliver everything in the queue once; returns system-specific details."""
        if self.system == MAILSPOOL:
            from mailspool.processor.loop import QueueProcessor

            kw = {} if self.connections is None else {"connections": self.connections}
            processor = QueueProcessor(self.path, self.mailer(), **kw)
            summary = processor.drain()
            return {"summary": repr(summary)}
        if self.system == ZOPE:
            from zope.sendmail.queue import QueueProcessorThread

            thread = QueueProcessorThread(interval=self.interval)
            thread.setMailer(self.mailer())
            thread.setQueuePath(self.path)
            thread.run(forever=False)
            return {}
        from repoze.sendmail.queue import QueueProcessor as RProcessor

        RProcessor(self.mailer(), self.path).send_messages()
        return {}

    # -- a running processor --------------------------------------------------

    def start(self) -> None:
        """Start a background processor that picks up newly committed mail."""
        if self.system == MAILSPOOL:
            from mailspool.processor.loop import QueueProcessor

            kw = {} if self.connections is None else {"connections": self.connections}
            self._processor = QueueProcessor(self.path, self.mailer(), interval=self.interval, **kw)
            if self.wake:
                self._on_commit = self._processor.wake
                self._delivery = None  # rebuilt with on_commit
            self._processor.start()
        elif self.system == ZOPE:
            from zope.sendmail.queue import QueueProcessorThread

            self._ensure_maildir()
            thread = QueueProcessorThread(interval=self.interval)
            thread.setMailer(self.mailer())
            thread.setQueuePath(self.path)
            thread.start()
            self._processor = thread
        else:
            from repoze.sendmail.queue import QueueProcessor as RProcessor

            self._ensure_maildir()
            qp = RProcessor(self.mailer(), self.path)

            def loop() -> None:
                while not self._stop_loop.is_set():
                    qp.send_messages()
                    self._stop_loop.wait(self.interval)

            self._thread = threading.Thread(target=loop, name="repoze-qp", daemon=True)
            self._thread.start()
            self._processor = qp

    def stop(self) -> None:
        if self.system == MAILSPOOL and self._processor is not None:
            self._processor.stop(timeout=10)
        elif self.system == ZOPE and self._processor is not None:
            self._processor.stop()
        elif self._thread is not None:
            self._stop_loop.set()
            self._thread.join(10)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads."""
    return time.process_time()
