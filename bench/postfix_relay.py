"""A private Postfix instance on a loopback port, with its anvil rate limit on.

For the optional ``drain-postfix`` scenario: a real MTA's answers to a
client that sends too fast (``450 4.7.1 Error: too much mail from
127.0.0.1`` at MAIL, from ``smtpd_client_message_rate_limit``).  The
instance is Debian's ``postfix`` package run from a configuration
directory of its own (``postfix -c DIR start``): its own queue, its own
log file, its SMTP server on a free port of 127.0.0.1, nothing delivered
locally; what it accepts it relays to a counting aiosmtpd relay
(:class:`relays.AiosmtpdRelay`), whose counters tell what arrived and how
many times.  :meth:`PostfixRelay.stop` stops the instance and removes its
directory.  Starting Postfix needs root; ``find(install=True)`` runs
``apt-get install -y postfix`` (non-interactive) when it is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from relays import AiosmtpdRelay, _wait_listening, free_port

__all__ = ["PostfixRelay"]

_MASTER_CF = "/etc/postfix/master.cf"


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()}")


class PostfixRelay:
    """Postfix on 127.0.0.1:``port``, taking ``message_rate`` messages per ``time_unit`` s.

    Quacks like :class:`relays.AiosmtpdRelay` for the scenarios: ``port``,
    ``probe`` (the counting relay's counters), ``reset()``, ``refused()``.
    Each ``reset()`` restarts the instance, so that a trial starts with
    anvil's counters at zero.
    """

    kind = "postfix"

    def __init__(self, binary: str, *, message_rate: int, time_unit: int) -> None:
        self.binary = binary
        self.message_rate = message_rate
        self.time_unit = time_unit
        self.port = 0
        self.sink = AiosmtpdRelay()
        self.probe = self.sink.probe
        self._dir = ""
        self._log_offset = 0
        self._running = False

    @staticmethod
    def find(install: bool = False) -> str | None:
        """The ``postfix`` command; installed with apt-get first when asked (root only)."""
        path = shutil.which("postfix") or (
            "/usr/sbin/postfix" if os.access("/usr/sbin/postfix", os.X_OK) else None
        )
        if path or not install:
            return path
        if shutil.which("apt-get") and os.geteuid() == 0:
            print("installing postfix (apt-get install -y postfix) ...")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update"], check=False, env=env)
            subprocess.run(["apt-get", "install", "-y", "postfix"], check=False, env=env)
        return shutil.which("postfix")

    @property
    def description(self) -> str:
        return (
            f"Postfix (Debian's package, a private instance) with "
            f"smtpd_client_message_rate_limit={self.message_rate} per "
            f"anvil_rate_time_unit={self.time_unit}s, relaying to a counting aiosmtpd relay"
        )

    @property
    def log(self) -> str:
        return os.path.join(self._dir, "maillog")

    def _configure(self) -> None:
        d = self._dir
        for sub in ("queue", "data"):
            os.makedirs(os.path.join(d, sub), mode=0o755, exist_ok=True)
        shutil.chown(os.path.join(d, "data"), "postfix")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": os.path.join(d, "queue"),
            "data_directory": os.path.join(d, "data"),
            "maillog_file": self.log,
            "maillog_file_prefixes": d,
            "syslog_name": "postfix-bench",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "bench-postfix.localdomain",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{self.sink.port}",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtputf8_enable": "no",
            # Postfix exempts $mynetworks from its rate limits by default.
            "smtpd_client_event_limit_exceptions": "",
            "smtpd_client_message_rate_limit": str(self.message_rate),
            "anvil_rate_time_unit": f"{self.time_unit}s",
        }
        with open(os.path.join(d, "main.cf"), "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in main.items())
        lines = []
        with open(_MASTER_CF) as f:
            for line in f:
                fields = line.split()
                if line[:1] in ("#", " ", "\t") or len(fields) < 8:
                    lines.append(line)
                    continue
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.port}"
                fields[4] = "n"  # no chroot: the queue is in a temporary directory
                lines.append("  ".join(fields) + "\n")
        with open(os.path.join(d, "master.cf"), "w") as f:
            f.writelines(lines)

    def start(self) -> None:
        self.sink.start()
        self._dir = tempfile.mkdtemp(prefix="bench-postfix-")
        os.chmod(self._dir, 0o755)
        self.port = free_port()
        self._configure()
        self._start_instance()

    def _start_instance(self) -> None:
        _run(self.binary, "-c", self._dir, "start")
        self._running = True
        _wait_listening(self.port, timeout=30)

    def _stop_instance(self) -> None:
        if self._running:
            subprocess.run([self.binary, "-c", self._dir, "stop"], capture_output=True, check=False)
            self._running = False
            time.sleep(1.0)  # master waits for its children before it goes

    def reset(self) -> None:
        self._stop_instance()
        self._start_instance()
        self.sink.reset()
        self._log_offset = os.path.getsize(self.log) if os.path.exists(self.log) else 0

    def refused(self) -> int:
        """MAIL commands refused for rate since the last reset, from Postfix's log."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_offset)
                text = f.read()
        except OSError:
            return 0
        return text.count(b"Message delivery request rate limit exceeded")

    def cpu_seconds(self) -> float:
        return 0.0

    def count(self) -> int:
        return self.sink.count()

    def distinct(self) -> int | None:
        return self.sink.distinct()

    def wait_for(self, expected: int, timeout: float = 5.0) -> int:
        return self.sink.wait_for(expected, timeout)

    def stop(self) -> None:
        self._stop_instance()
        self.sink.stop()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
