"""SMTP relays on 127.0.0.1 that count every message they accept.

Each relay runs in a process of its own, so that its work never shares an
interpreter lock with the system being measured:

* :class:`SmtpSink` — Postfix's ``smtp-sink``, a fast C sink.  It prints its
  counters (``mesg=N``) after every final dot; they go to a file we read.
* :class:`AiosmtpdRelay` — an aiosmtpd server, optionally waiting before it
  answers the final dot (a "slow" relay), optionally offering STARTTLS
  with a trustme certificate, optionally behaving as real relays do: a
  rate limit (a token bucket of R messages a second, the excess refused at
  ``MAIL`` with ``454 4.7.0 Throttling failure``, as Amazon SES answers) or
  one-off faults at every phase for a fraction of the transactions.  Its
  counters live in shared memory: messages accepted, distinct Message-Ids
  among them (a duplicate shows as a gap), and the monotonic time of the
  last one, which a child process can wait for with
  :attr:`AiosmtpdRelay.probe` (pickup latency).

Both count a message when they answer the final dot with 250; a scenario
compares that count with what it sent, and reports an error on a mismatch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["AiosmtpdRelay", "Probe", "SmtpSink", "free_port", "make_tls_files"]

_SPAWN = multiprocessing.get_context("spawn")
_MSGID = re.compile(rb"^Message-I[dD]:[ \t]*(<[^>\r\n]*>)", re.MULTILINE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay on port {port} did not start") from None
            time.sleep(0.02)


def _proc_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def make_tls_files(directory: str) -> dict[str, str]:
    """A trustme CA and a certificate for 127.0.0.1, written as PEM files.

    Returns:
        ``{"ca": ..., "cert": ..., "key": ...}`` file paths.
    """
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = {
        "ca": os.path.join(directory, "ca.pem"),
        "cert": os.path.join(directory, "cert.pem"),
        "key": os.path.join(directory, "key.pem"),
    }
    ca.cert_pem.write_to_path(paths["ca"])
    leaf.cert_chain_pems[0].write_to_path(paths["cert"])
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(paths["cert"], append=True)
    leaf.private_key_pem.write_to_path(paths["key"])
    return paths


class SmtpSink:
    """Postfix's ``smtp-sink`` on a free port, counting with ``-c``."""

    kind = "smtp-sink"

    def __init__(self, path: str) -> None:
        self.binary = path
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="bench-sink-")
        self._out = os.path.join(self._dir, "counters")
        self._base = 0

    @staticmethod
    def find() -> str | None:
        """The ``smtp-sink`` binary, or None when Postfix is not installed."""
        return shutil.which("smtp-sink") or (
            "/usr/sbin/smtp-sink" if os.access("/usr/sbin/smtp-sink", os.X_OK) else None
        )

    @property
    def description(self) -> str:
        return "Postfix smtp-sink (C)"

    def start(self) -> None:
        self.port = free_port()
        cmd = [self.binary, "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # it refuses to run as root without -u
        cmd += [f"127.0.0.1:{self.port}", "256"]
        with open(self._out, "wb") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        _wait_listening(self.port)
        # The start-up probe above is one session; messages are what we count.
        self._base = 0

    def _read_count(self) -> int:
        try:
            with open(self._out, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                tail = f.read()
        except OSError:
            return 0
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def reset(self) -> None:
        self._base = self._read_count()

    def cpu_seconds(self) -> float:
        return _proc_cpu_seconds(self._proc.pid if self._proc else None)

    def count(self) -> int:
        return self._read_count() - self._base

    def distinct(self) -> int | None:
        return None  # smtp-sink does not look at the content

    def bare_lf(self) -> int | None:
        return None

    def wait_for(self, expected: int, timeout: float = 5.0) -> int:
        """Wait until ``expected`` messages were counted (or the timeout)."""
        deadline = time.monotonic() + timeout
        n = self.count()
        while n < expected and time.monotonic() < deadline:
            time.sleep(0.02)
            n = self.count()
        time.sleep(0.05)  # let any message beyond the expected ones show
        return self.count()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class Probe:
    """Shared counters of an aiosmtpd relay, usable in a spawned child.

    ``arrived`` is released once per accepted message; ``last`` holds the
    ``time.monotonic()`` of the latest one (CLOCK_MONOTONIC is system-wide,
    so the value compares with the child's own clock).
    """

    accepted: Any
    distinct: Any
    bare_lf: Any
    generation: Any
    last: Any
    arrived: Any
    refused: Any = None  # MAIL refused for rate
    faults: Any = None  # faults injected

    def drain_signals(self) -> None:
        while self.arrived.acquire(False):
            pass


#: The faults of a flaky relay, in turn, one per faulty transaction.
FAULTS = ("mail-451", "rcpt-421-close", "data-451", "data-drop-before-reply")


def _bump(value: Any) -> None:
    if value is not None:
        with value.get_lock():
            value.value += 1


class _Handler:
    def __init__(self, probe: Probe, delay: float) -> None:
        self.probe = probe
        self.delay = delay
        self.seen: set[bytes] = set()
        self.generation = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            import asyncio

            await asyncio.sleep(self.delay)
        probe = self.probe
        gen = probe.generation.value
        if gen != self.generation:
            self.generation = gen
            self.seen.clear()
        content: bytes = envelope.original_content or envelope.content or b""
        m = _MSGID.search(content, 0, 8192)
        key = m.group(1) if m else content
        if b"\n" in content.replace(b"\r\n", b""):
            with probe.bare_lf.get_lock():
                probe.bare_lf.value += 1
        if key not in self.seen:
            self.seen.add(key)
            with probe.distinct.get_lock():
                probe.distinct.value += 1
        with probe.accepted.get_lock():
            probe.accepted.value += 1
        probe.last.value = time.monotonic()
        probe.arrived.release()
        return "250 2.0.0 OK queued"


class _Realistic(_Handler):
    """A relay that limits its rate or fails some transactions (see :class:`AiosmtpdRelay`)."""

    def __init__(self, probe: Probe, delay: float, rate: float, fault_every: int) -> None:
        super().__init__(probe, delay)
        self.rate = rate
        self.burst = max(1.0, rate / 10)  # a tenth of a second's worth
        self.tokens = self.burst
        self.stamp = time.monotonic()
        self.fault_every = fault_every
        self.transactions = 0
        self.connections = 0
        self.faulted: set[bytes] = set()  # Message-Ids already faulted at the data

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does when there is no hook
        self.connections += 1
        if self.fault_every and self.connections % self.fault_every == self.fault_every // 2:
            _bump(self.probe.faults)
            self._close_soon(server)
            return ["421 4.3.2 service not available, closing channel"]
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.fault = None
        if self.rate:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens < 1:
                _bump(self.probe.refused)
                return "454 4.7.0 Throttling failure: Maximum sending rate exceeded"
            self.tokens -= 1
        if self.fault_every:
            self.transactions += 1
            if self.transactions % self.fault_every == 0:
                turn = (self.transactions // self.fault_every) % len(FAULTS)
                envelope.fault = FAULTS[turn]
                if envelope.fault == "mail-451":
                    _bump(self.probe.faults)
                    return "451 4.3.0 temporary failure, try again"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if getattr(envelope, "fault", None) == "rcpt-421-close":
            envelope.fault = None
            _bump(self.probe.faults)
            self._close_soon(server)
            return "421 4.4.2 connection dropped, try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    @staticmethod
    def _close_soon(server: Any) -> None:
        import asyncio

        def close() -> None:
            if server.transport is not None:
                server.transport.close()

        asyncio.get_running_loop().call_later(0.01, close)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        fault = getattr(envelope, "fault", None)
        if fault in ("data-451", "data-drop-before-reply"):
            content: bytes = envelope.original_content or envelope.content or b""
            m = _MSGID.search(content, 0, 8192)
            key = m.group(1) if m else content
            if key not in self.faulted:
                self.faulted.add(key)  # one-off: the retry of this message goes through
                _bump(self.probe.faults)
                if fault == "data-451":
                    return "451 4.3.0 error in processing, try again"
                server.transport.abort()  # the message is not kept: no reply ever comes
                return "451 4.3.0 (never sent)"
        return await super().handle_DATA(server, session, envelope)


def _aiosmtpd_main(
    port: int,
    delay: float,
    tls: dict[str, str] | None,
    probe: Probe,
    ready: Any,
    stop: Any,
    rate: float = 0.0,
    fault_every: int = 0,
) -> None:
    import logging
    import ssl

    import aiosmtpd.smtp
    from aiosmtpd.controller import Controller

    logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    # Accept bare LF line endings (one "line" is then the whole message) as
    # smtp-sink and Postfix's default do, and count them: repoze.sendmail
    # sends them, and aiosmtpd's 1001-octet line limit would refuse it.
    aiosmtpd.smtp.SMTP.line_length_limit = 1 << 24
    kwargs: dict[str, Any] = {}
    if tls is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls["cert"], tls["key"])
        kwargs.update(tls_context=ctx, require_starttls=True)
    handler = _Handler(probe, delay)
    if rate or fault_every:
        handler = _Realistic(probe, delay, rate, fault_every)
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        server_hostname="bench-relay",
        **kwargs,
    )
    controller.start()
    ready.set()
    stop.wait()
    controller.stop()


class AiosmtpdRelay:
    """An aiosmtpd relay in its own process.

    Args:
        delay: seconds to wait before answering the final dot.
        tls: PEM files from :func:`make_tls_files` to offer (and require)
            STARTTLS, or None.
        rate: take at most this many messages a second (a token bucket
            holding a tenth of a second's worth); the excess is refused at
            ``MAIL`` with 454 4.7.0, the session stays open.  0: no limit.
        fault_every: one transaction in this many meets a fault, in turn
            (:data:`FAULTS`): 451 at MAIL, 421 at RCPT and the connection
            closed, 451 after the data, the connection cut after the data
            before any reply (the message is not kept); and one connection
            in this many gets 421 at EHLO.  A message meets a fault after
            its data once at most.  0: no faults.
    """

    kind = "aiosmtpd"

    def __init__(
        self,
        delay: float = 0.0,
        tls: dict[str, str] | None = None,
        *,
        rate: float = 0.0,
        fault_every: int = 0,
    ) -> None:
        self.delay = delay
        self.tls = tls
        self.rate = rate
        self.fault_every = fault_every
        self.port = 0
        self.probe = Probe(
            accepted=_SPAWN.Value("q", 0),
            distinct=_SPAWN.Value("q", 0),
            bare_lf=_SPAWN.Value("q", 0),
            generation=_SPAWN.Value("q", 0, lock=False),
            last=_SPAWN.Value("d", 0.0, lock=False),
            arrived=_SPAWN.Semaphore(0),
            refused=_SPAWN.Value("q", 0),
            faults=_SPAWN.Value("q", 0),
        )
        self._stop = _SPAWN.Event()
        self._proc: Any = None

    @property
    def description(self) -> str:
        parts = ["aiosmtpd"]
        if self.delay:
            parts.append(f"{self.delay * 1000:.0f} ms before answering the final dot")
        if self.tls:
            parts.append("STARTTLS required, trustme ECDSA certificate")
        if self.rate:
            parts.append(f"{self.rate:g} messages/s, the excess refused at MAIL with 454 4.7.0")
        if self.fault_every:
            parts.append(
                f"a one-off fault for 1 transaction in {self.fault_every} "
                "(451 at MAIL, 421 at RCPT + close, 451 after the data, cut before "
                f"the final reply) and 421 at EHLO for 1 connection in {self.fault_every}"
            )
        return ", ".join(parts)

    def start(self) -> None:
        self.port = free_port()
        ready = _SPAWN.Event()
        self._proc = _SPAWN.Process(
            target=_aiosmtpd_main,
            args=(
                self.port,
                self.delay,
                self.tls,
                self.probe,
                ready,
                self._stop,
                self.rate,
                self.fault_every,
            ),
            daemon=True,
        )
        self._proc.start()
        if not ready.wait(30):
            self.stop()
            raise RuntimeError("aiosmtpd relay did not start")
        self.reset()

    def reset(self) -> None:
        p = self.probe
        p.generation.value += 1
        with p.accepted.get_lock():
            p.accepted.value = 0
        with p.distinct.get_lock():
            p.distinct.value = 0
        with p.bare_lf.get_lock():
            p.bare_lf.value = 0
        for extra in (p.refused, p.faults):
            with extra.get_lock():
                extra.value = 0
        p.drain_signals()

    def count(self) -> int:
        return int(self.probe.accepted.value)

    def cpu_seconds(self) -> float:
        return _proc_cpu_seconds(self._proc.pid if self._proc else None)

    def distinct(self) -> int | None:
        return int(self.probe.distinct.value)

    def refused(self) -> int:
        """MAIL commands refused for rate since the last reset."""
        return int(self.probe.refused.value)

    def bare_lf(self) -> int | None:
        """Messages received with bare LF line endings (RFC 5321 wants CRLF)."""
        return int(self.probe.bare_lf.value)

    def wait_for(self, expected: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while self.count() < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)
        return self.count()

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._proc = None


@contextlib.contextmanager
def running(relay: Any) -> Any:
    """Start ``relay`` for the duration of a ``with`` block."""
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()
