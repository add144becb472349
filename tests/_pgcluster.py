"""Fixtures for a private PostgreSQL server that tests may stop and start.

The server is :class:`torture.pgserver.Cluster` (shared with the torture
run); without the binaries, every test that needs one is skipped, saying
so.  Import the fixture into a test module::

    from _pgcluster import pg_cluster  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from torture.pgserver import Cluster, unavailable

__all__ = ["Cluster", "pg_cluster"]


@pytest.fixture(scope="session")
def _pg_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    why = unavailable()
    if why is not None:
        pytest.skip(f"no private PostgreSQL server: {why}")
    cluster = Cluster.make(tmp_path_factory.mktemp("pgcluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def pg_cluster(_pg_cluster_session: Cluster) -> Cluster:
    """A private server, running (a test that stopped it leaves it to be started here)."""
    if not _pg_cluster_session.running:
        _pg_cluster_session.start()
    return _pg_cluster_session
