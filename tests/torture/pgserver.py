"""A private PostgreSQL server that may be stopped, started and restarted.

The shared server on port 5432 must never be restarted: other runs use
it.  The outage tests and the torture run's PostgreSQL variant make a
server of their own instead: ``initdb`` in a temporary directory and
``pg_ctl`` on a free port of 127.0.0.1 (trust authentication, ``fsync``
off: they kill and restart processes, they do not cut the power).  The
binaries are found in ``PG_BIN``, else on ``PATH``, else in
``/usr/lib/postgresql/*/bin``.  PostgreSQL refuses to run as root: as
root the server runs as the ``postgres`` user, in a directory of ``/tmp``
that user may enter (:meth:`Cluster.make`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["Cluster", "find_bin", "unavailable"]


def find_bin() -> str | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None."""
    candidates = [os.environ.get("PG_BIN", "")]
    found = shutil.which("initdb")
    candidates.append(os.path.dirname(found) if found else "")
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for d in candidates:
        if d and all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            return d
    return None


def _runas() -> str | None:
    """The user to run the server as ("" for ourselves); None when there is none."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return ""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return "postgres"


def unavailable() -> str | None:
    """Why no private server can be made here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'mailspool[postgres]')"
    if find_bin() is None:
        return "the PostgreSQL server binaries (initdb, pg_ctl) are not installed; set PG_BIN"
    if _runas() is None:
        return "running as root, and there is no 'postgres' user to run a server as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A PostgreSQL server in ``base`` (created by :meth:`create`)."""

    def __init__(self, base: Path) -> None:
        self.bin = find_bin() or ""
        self.user = _runas() or ""
        self.base = base
        self.data = base / "data"
        self.log = base / "server.log"
        self.port = _free_port()
        #: a database the tests may use (the server's own ``postgres``)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [os.path.join(self.bin, argv[0]), *argv[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            tail = self.log.read_text(errors="replace")[-800:] if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed: {proc.stdout}{proc.stderr}{tail}")
        return proc

    def create(self) -> None:
        """initdb: a new, stopped server."""
        if self.user:
            shutil.chown(self.base, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N",
                  "-E", "UTF8", "--locale=C")  # fmt: skip

    def start(self) -> None:
        """Start the server; return once it accepts connections."""
        opts = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=60"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", opts, "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: sessions are ended; ``immediate``: a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    @classmethod
    def make(cls, where: Path) -> Cluster:
        """A new, stopped server in ``where`` (or, as root, in a new directory
        of ``/tmp`` the server's user may enter; :meth:`remove` deletes it)."""
        if _runas():
            base = Path(tempfile.mkdtemp(prefix="mailspool-pgcluster-"))
            base.chmod(0o755)
        else:
            where.mkdir(parents=True, exist_ok=True)
            base = where
        cluster = cls(base)
        cluster.create()
        return cluster

    def remove(self) -> None:
        """Stop the server (if running) and delete a directory :meth:`make` chose."""
        if self.running:
            self.stop("immediate")
        if _runas():
            shutil.rmtree(self.base, ignore_errors=True)
