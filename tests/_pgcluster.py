"""A private PostgreSQL server that tests may stop, start and restart.

The shared server (:mod:`_pg`) must never be restarted: other test runs
use it.  Tests of outages get a server of their own instead: ``initdb``
in a temporary directory and ``pg_ctl`` on a free port of 127.0.0.1
(trust authentication, ``fsync`` off: these tests restart processes,
they do not cut the power).  The binaries are found in ``PG_BIN``, else
on ``PATH``, else in ``/usr/lib/postgresql/*/bin``; without them the tests
that need one are skipped, saying so.  PostgreSQL refuses to run as root:
as root the server runs as the ``postgres`` user, in a directory of
``/tmp`` that user may enter.

Import the fixture into a test module::

    from _pgcluster import pg_cluster  # noqa: F401
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["Cluster", "find_bin", "pg_cluster", "unavailable"]


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


@pytest.fixture(scope="session")
def _pg_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    why = unavailable()
    if why is not None:
        pytest.skip(f"no private PostgreSQL server: {why}")
    if _runas():  # root: the server's user must be able to enter its directory
        base = Path(tempfile.mkdtemp(prefix="mailspool-pgcluster-"))
        base.chmod(0o755)
    else:
        base = tmp_path_factory.mktemp("pgcluster")
    cluster = Cluster(base)
    try:
        cluster.create()
        cluster.start()
        yield cluster
    finally:
        if cluster.running:
            cluster.stop("immediate")
        if _runas():
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_cluster(_pg_cluster_session: Cluster) -> Cluster:
    """A private server, running (a test that stopped it leaves it to be started here)."""
    if not _pg_cluster_session.running:
        _pg_cluster_session.start()
    return _pg_cluster_session
