"""A real Prometheus server scrapes ``mailspool run --metrics`` and answers a query.

Needs the ``prometheus`` binary (Debian's package; ``.ci/run`` installs
it); skipped with the reason otherwise.  The server runs on a free
loopback port with its own configuration and storage in ``tmp_path``, and
is stopped at the end.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from _relays import enqueue, wait_for
from conftest import RelayFactory
from mailspool import Spool
from test_cli_run import SCRIPT, relay_env

PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no prometheus binary (Debian: apt-get install prometheus; .ci/run does)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def test_prometheus_scrapes_a_running_processor(smtp_relay: RelayFactory, tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    relay = smtp_relay()
    queue = tmp_path / "spool"
    enqueue(Spool(queue), 5)
    metrics_port, prom_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: mailspool\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    runner = subprocess.Popen(
        [SCRIPT, "run", "--metrics", f"127.0.0.1:{metrics_port}"],
        env=relay_env(relay, queue),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: len(relay.messages) == 5, 30)

        def answered() -> bool:
            try:
                result = query(prom_port, "mailspool_messages_sent_total")
            except OSError:
                return False
            return bool(result) and result[0]["value"][1] == "5"

        assert wait_for(answered, 60), "Prometheus never saw the 5 messages sent"
        (ready,) = query(prom_port, 'mailspool_queue_messages{state="ready"}')
        assert ready["metric"]["job"] == "mailspool"
        assert ready["value"][1] == "0"
        (up,) = query(prom_port, 'up{job="mailspool"}')
        assert up["value"][1] == "1"
    finally:
        prom_err = stop(prometheus)
        run_err = stop(runner)
    assert runner.returncode == 0, run_err
    assert prometheus.returncode == 0, prom_err[-2000:]
