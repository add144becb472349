"""A real Postfix on a loopback port, configured and run by the test itself.

Each instance has its own configuration and queue directories in a fresh
temporary directory, an ``smtpd`` on ``127.0.0.1:<free port>``, and
delivers every message for ``example.org`` to one Maildir
(``virtual(8)``), where the test counts them.  It is started with
``postfix -c DIR start`` and always stopped.  Needs the ``postfix``
package (``.ci/run`` installs it) and root, as Postfix's master does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from _relays import message_id

POSTFIX = shutil.which("postfix") or (
    "/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None
)


def why_not() -> str | None:
    """Why a Postfix cannot be run here, or None when it can."""
    if POSTFIX is None:
        return "Postfix is not installed (apt-get install postfix; .ci/run does it)"
    if os.geteuid() != 0:
        return "running Postfix needs root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user: the postfix package is not installed properly"
    return None


# Only the services a loopback relay delivering to a Maildir needs; no chroot.
_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Postfix:
    """One private Postfix instance; ``settings`` are extra main.cf lines."""

    def __init__(self, settings: dict[str, str]) -> None:
        assert POSTFIX is not None
        self.dir = Path(tempfile.mkdtemp(prefix="mailspool-postfix-"))
        self.dir.chmod(0o755)  # its daemons run as the postfix user
        self.port = _free_port()
        owner = pwd.getpwnam("postfix")
        for name in ("etc", "queue", "data", "mail"):
            (self.dir / name).mkdir()
        for name in ("data", "mail"):
            os.chown(self.dir / name, owner.pw_uid, owner.pw_gid)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": f"{self.dir}/queue",
            "data_directory": f"{self.dir}/data",
            "maillog_file": f"{self.dir}/maillog",
            "maillog_file_prefixes": str(self.dir),
            "myhostname": "relay.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_client_event_limit_exceptions": "",  # rate limits apply to 127.0.0.1 too
            "virtual_mailbox_domains": "example.org",
            "virtual_mailbox_base": f"{self.dir}/mail",
            "virtual_mailbox_maps": "static:box/",
            "virtual_uid_maps": f"static:{owner.pw_uid}",
            "virtual_gid_maps": f"static:{owner.pw_gid}",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            **settings,
        }
        text = "".join(f"{k} = {v}\n" for k, v in main.items())
        (self.dir / "etc" / "main.cf").write_text(text)
        (self.dir / "etc" / "master.cf").write_text(_MASTER.format(port=self.port))
        self.running = False

    def _postfix(self, *args: str) -> None:
        assert POSTFIX is not None
        subprocess.run(
            [POSTFIX, "-c", str(self.dir / "etc"), *args],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def start(self) -> None:
        self._postfix("start")
        self.running = True
        deadline = time.monotonic() + 10
        while True:  # until smtpd answers
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(3) == b"220":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix did not start; see {self.dir}/maillog")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.running:
            self.running = False
            self._postfix("stop")
        deadline = time.monotonic() + 10
        while self._listening() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def delivered(self) -> Counter[str]:
        """Message-Id -> how many times it reached the mailbox."""
        new = self.dir / "mail" / "box" / "new"
        if not new.is_dir():
            return Counter()
        return Counter(message_id(p.read_bytes()) for p in new.iterdir())

    def settled(self) -> bool:
        """True when Postfix holds no message any more (all delivered)."""
        queue = self.dir / "queue"
        for area in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(queue / area):
                if files:
                    return False
        return True

    def log_count(self, text: str) -> int:
        """How many lines of its log contain ``text``."""
        try:
            return (self.dir / "maillog").read_text(errors="replace").count(text)
        except OSError:
            return 0

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
