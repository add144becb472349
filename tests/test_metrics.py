"""Prometheus metrics: scraped over HTTP while a real processor drains a real spool.

The relay is a real aiosmtpd on 127.0.0.1 (``smtp_relay``); what the
scrape says is checked against what the relay received and against
``mailspool status --json``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import transaction
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from _relays import PerRecipient, enqueue, wait_for
from conftest import RELAY_PASSWORD, RelayFactory
from mailspool import QueuedMailDelivery, QueueProcessor, RetryPolicy, SMTPMailer, Spool
from mailspool.cli.main import main
from mailspool.metrics import Metrics, parse_address, serve
from test_cli_run import SCRIPT, relay_env

GOOD = ["jane@example.org", "bob@example.net"]
BAD = "nobody@example.org"  # 550
LATER = "busy@example.com"  # 450


def scrape(port: int) -> tuple[str, dict[str, float]]:
    """The text of /metrics and its samples as {'name{label="v"}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return text, samples


def status_json(queue: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["status", "--json", "--queue", queue]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def no_address_or_secret(text: str) -> None:
    assert "@" not in text
    assert RELAY_PASSWORD not in text
    for addr in (*GOOD, BAD, LATER):
        assert addr.split("@")[0] not in text


def test_scrape_during_a_drain_matches_relay_and_status(
    smtp_relay: RelayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relay = smtp_relay(
        PerRecipient({BAD: "550 5.1.1 no such user", LATER: "450 4.2.1 try later"}),
        tls="starttls",
        auth=True,
    )
    spool = Spool(tmp_path / "spool")
    # Committed through a delivery, so the enqueue histogram has seen them.
    delivery = QueuedMailDelivery(spool.path)
    registry = CollectorRegistry()
    metrics = Metrics(registry, cache=0)  # before the commits: it counts them
    with transaction.manager:
        for n in range(12):
            delivery.send("app@example.org", GOOD, f"Subject: {n}\n\nhi\n")
    with transaction.manager:
        delivery.send("app@example.org", [BAD], "Subject: bad\n\nhi\n")
        delivery.send("app@example.org", [LATER, GOOD[0]], "Subject: later\n\nhi\n")
    enqueue(spool, 2, to=[BAD, GOOD[1]])  # partly sent, partly failed: counted failed
    processor = QueueProcessor(
        spool,
        SMTPMailer(**relay.mailer_kwargs()),
        retry=RetryPolicy(first_delay=3600),
        rate_limit=500,
        watch=False,
    )
    metrics.watch(processor)
    server = serve("127.0.0.1:0", registry)
    port = server.server_port
    try:
        _, before = scrape(port)
        assert before['mailspool_queue_messages{state="ready"}'] == 16
        assert before["mailspool_messages_queued_total"] == 14
        assert before["mailspool_enqueue_seconds_count"] == 2  # two commits
        assert before["mailspool_relay_rate_limit"] == 500
        assert before["mailspool_relay_send_rate"] == 500  # nothing learned: the limit
        assert before["mailspool_relay_rate_learned"] == 0

        done = threading.Event()
        worker = threading.Thread(target=lambda: (processor.drain(), done.set()))
        worker.start()
        seen = 0.0
        while not done.is_set():  # scrapes while it drains: always parseable, never less
            text, during = scrape(port)
            no_address_or_secret(text)
            assert during["mailspool_messages_sent_total"] >= seen
            seen = during["mailspool_messages_sent_total"]
        worker.join()
        text, after = scrape(port)
    finally:
        server.shutdown()
        server.server_close()
        metrics.close()
        processor.stop()

    no_address_or_secret(text)
    whole = sum(1 for m in relay.messages if sorted(m.rcpt_tos) == sorted(GOOD))
    assert whole == 12
    assert after["mailspool_messages_sent_total"] == whole
    assert after['mailspool_messages_failed_total{reason="5xx"}'] == 3  # BAD, and BAD+GOOD x2
    assert after['mailspool_messages_deferred_total{reason="4xx"}'] == 1
    assert after["mailspool_messages_quarantined_total"] == 0
    assert after['mailspool_delivery_attempts_total{reply_class="2xx"}'] == whole
    assert after['mailspool_delivery_attempts_total{reply_class="5xx"}'] == 3
    assert after['mailspool_delivery_attempts_total{reply_class="4xx"}'] == 1
    # Every message the relay accepted (whole or in part) is timed from its commit.
    assert after["mailspool_delivery_seconds_count"] == len(relay.messages) == 15
    assert after["mailspool_smtp_transaction_seconds_count"] == 16
    assert after["mailspool_relay_paused"] == 0

    st = status_json(spool.path, capsys)
    for state in ("ready", "in_flight", "deferred", "held", "failed", "quarantined"):
        assert after[f'mailspool_queue_messages{{state="{state}"}}'] == st[state], state
    assert st["deferred"] == 1 and st["failed"] == 3
    assert after["mailspool_oldest_waiting_age_seconds"] == pytest.approx(st["oldest_age"], abs=2)
    assert after["mailspool_oldest_ready_age_seconds"] == 0  # none ready


def test_an_unreadable_file_is_counted_quarantined(
    smtp_relay: RelayFactory, tmp_path: Path, mailer_for: Any
) -> None:
    relay = smtp_relay()
    spool = Spool(tmp_path / "spool")
    (tmp_path / "spool" / "new" / "1700000000.garbage.test").write_bytes(b"\x00not a spool file")
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    try:
        with QueueProcessor(spool, mailer_for(relay), watch=False) as processor:
            summary = processor.drain()
        assert summary.quarantined == 1
        assert registry.get_sample_value("mailspool_messages_quarantined_total") == 1
    finally:
        metrics.close()


def test_run_serves_metrics_until_stopped(smtp_relay: RelayFactory, tmp_path: Path) -> None:
    relay = smtp_relay()
    queue = tmp_path / "spool"
    enqueue(Spool(queue), 3, to=GOOD)
    server = serve("127.0.0.1:0", CollectorRegistry())  # only to find a free port
    port = server.server_port
    server.shutdown()
    server.server_close()
    proc = subprocess.Popen(
        [SCRIPT, "run", "--metrics", f"127.0.0.1:{port}"],
        env=relay_env(relay, queue),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: len(relay.messages) == 3, 20)

        def scraped() -> bool:
            try:
                return scrape(port)[1].get("mailspool_messages_sent_total") == 3
            except OSError:
                return False

        assert wait_for(scraped, 20)
        text, samples = scrape(port)
        assert samples['mailspool_queue_messages{state="ready"}'] == 0
        assert "process_cpu_seconds_total" in samples
        assert "@" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("address", ["9464", "localhost", "127.0.0.1:99999", ":80"])
def test_a_bad_metrics_address_is_one_line_and_exit_2(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError):
        parse_address(address)
    Spool(tmp_path / "spool")
    # drain: its logging stays at WARNING (run's INFO would stay set on the
    # root logger for the tests after this one).
    code = main(["drain", "--queue", str(tmp_path / "spool"), "--metrics", address])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--metrics" in err and "HOST:PORT" in err


def test_no_prometheus_import_unless_asked() -> None:
    code = (
        "import sys, mailspool, mailspool.cli, mailspool.processor, mailspool.processor.observe;"
        "from mailspool.cli.main import main;"
        "main(['status', '--help']);"
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"--watch", proc.stdout)


def test_histograms_read_as_the_client_library_writes_them() -> None:
    from prometheus_client import Histogram, generate_latest

    from mailspool.metrics import FAST_BUCKETS, _Histogram

    values = [0.0, 0.0005, 0.0007, 0.001, 0.3, 2.5, 29.9, 30.0, 31.0, 1e6]
    theirs = CollectorRegistry()
    reference = Histogram("h_seconds", "h", buckets=FAST_BUCKETS, registry=theirs)
    ours = _Histogram(FAST_BUCKETS)
    for v in values:
        reference.observe(v)
        ours.observe(v)

    def samples(text: str) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if not s.name.endswith("_created")
        }

    class One:
        def collect(self) -> Any:
            yield ours.family("h_seconds", "h")

    mine = CollectorRegistry()
    mine.register(One())  # type: ignore[arg-type]
    assert samples(generate_latest(mine).decode()) == samples(generate_latest(theirs).decode())


def test_every_metric_documented_and_charted_exists(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "observability.md").read_text()
    dashboard = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    charted = json.dumps(dashboard)
    processor = QueueProcessor(Spool(tmp_path / "spool"), object(), rate_limit=5, watch=False)
    metrics = Metrics(processor=processor)
    try:
        text = generate_latest(metrics.registry).decode()
    finally:
        metrics.close()
    families = {f.name for f in text_string_to_metric_families(text)}
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    named = set(re.findall(r"mailspool_[a-z_]+[a-z]", doc + charted))
    assert len(named) > 15
    assert sorted(named - exported - families) == []
    assert {n for n in families if n.startswith("mailspool_")} <= {
        n.removesuffix("_total") for n in named
    } | {n.removesuffix("_bucket") for n in named}


def test_a_paused_relay_shows_in_the_gauges(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spool = Spool(tmp_path / "spool")
    enqueue(spool, 2)
    mailer = SMTPMailer(host="127.0.0.1", port=port, tls="none", connect_timeout=2)
    processor = QueueProcessor(spool, mailer, watch=False)
    metrics = Metrics(processor=processor, cache=0)
    try:
        assert processor.drain().relay_paused
        r = metrics.registry
        assert r.get_sample_value("mailspool_relay_paused") == 1
        assert r.get_sample_value("mailspool_relay_failures") == 1
        assert r.get_sample_value("mailspool_relay_rate_limit") is None  # no limit set
        assert r.get_sample_value("mailspool_relay_send_rate") is None  # not paced
        assert r.get_sample_value("mailspool_queue_messages", {"state": "ready"}) == 2
        assert r.get_sample_value("mailspool_oldest_ready_age_seconds") >= 0
        # Nothing was attempted for the messages: the relay's trouble is not theirs.
        assert (
            sum(
                r.get_sample_value("mailspool_delivery_attempts_total", {"reply_class": c}) or 0
                for c in ("2xx", "4xx", "5xx", "none")
            )
            == 0
        )
    finally:
        metrics.close()
        processor.stop()


def test_metrics_without_prometheus_client_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import sys

    Spool(tmp_path / "spool")
    code = (
        "import sys; sys.modules['prometheus_client'] = None;"
        "from mailspool.cli.main import main;"
        f"sys.exit(main(['drain', '--queue', {str(tmp_path / 'spool')!r},"
        " '--metrics', '127.0.0.1:9464']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == (
        "mailspool: --metrics needs prometheus_client: pip install 'mailspool[metrics]'\n"
    )


def test_a_rate_learned_from_the_relay_shows_in_the_gauges(
    smtp_relay: RelayFactory, tmp_path: Path
) -> None:
    from _scripted_relays import TokenBucket

    bucket = TokenBucket(rate=40, burst=4, close=False)
    relay = smtp_relay(bucket)
    spool = Spool(tmp_path / "spool")
    enqueue(spool, 40)
    processor = QueueProcessor(
        spool, SMTPMailer(**relay.mailer_kwargs()), connections=4, watch=False
    )
    metrics = Metrics(processor=processor, cache=0)
    try:
        assert processor.process_once().sent == 40
        r = metrics.registry
        assert bucket.refused >= 1
        assert r.get_sample_value("mailspool_relay_rate_learned") == 1
        assert r.get_sample_value("mailspool_relay_send_rate") == processor.pacer.rate
        assert r.get_sample_value("mailspool_relay_rate_limit") is None
        # A "too fast" refusal puts the message back untouched: not an attempt.
        assert r.get_sample_value("mailspool_messages_sent_total") == 40
        assert r.get_sample_value("mailspool_delivery_attempts_total", {"reply_class": "4xx"}) == 0
    finally:
        metrics.close()
        processor.stop()
