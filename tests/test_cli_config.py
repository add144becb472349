"""`mailspool config`, the retry and relay-pause settings, and the settings table's reach.

The settings go through main(argv) with a real environment (monkeypatched
variables), real TOML files in tmp_path and real password files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mailspool.cli.main import main
from mailspool.cli.opening import make_processor
from mailspool.cli.settings import FIELDS, Settings, load_settings, resolve_settings
from mailspool.maildir.spool import Spool
from mailspool.processor.loop import RetryPolicy

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MAILSPOOL_"):
            monkeypatch.delenv(name)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rows(out: str) -> dict[str, tuple[str, str]]:
    """``{setting: (value, origin)}`` from the text output."""
    got = {}
    for line in out.splitlines()[1:]:
        name, value, origin = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        got[name] = (value, origin)
    return got


def test_config_shows_each_value_and_where_it_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "m.toml"
    conf.write_text(
        'queue = "spool"\n[relay]\nhost = "file.example"\nport = 2500\n'
        '[retry]\nrelay_first_delay = "1m"\n'
    )
    monkeypatch.setenv("MAILSPOOL_CONFIG", str(conf))
    monkeypatch.setenv("MAILSPOOL_PORT", "2600")
    monkeypatch.setenv("MAILSPOOL_TIMEOUT", "90")
    code, out, err = run(capsys, "config", "--port", "2700", "--relay-max-delay", "2h")
    assert code == 0, err
    assert out.splitlines()[0] == f"config file: {conf} (from MAILSPOOL_CONFIG)"
    got = rows(out)
    assert got["queue"] == (str(tmp_path / "spool"), f"{conf} queue")
    assert got["host"] == ("file.example", f"{conf} [relay] host")
    assert got["port"] == ("2700", "--port")
    assert got["timeout"] == ("90s", "MAILSPOOL_TIMEOUT")
    assert got["relay_first_delay"] == ("1m", f"{conf} [retry] relay_first_delay")
    assert got["relay_max_delay"] == ("2h", "--relay-max-delay")
    assert got["give_up_after"] == ("5d", "default")
    assert got["password"] == ("not set", "default")
    assert set(got) == {f.name for f in FIELDS}
    assert not (tmp_path / "spool").exists()  # looking at settings touches nothing


def test_config_never_shows_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "S3cret-pw-42"
    monkeypatch.setenv("MAILSPOOL_USERNAME", "app")
    monkeypatch.setenv("MAILSPOOL_PASSWORD", secret)
    code, out, _ = run(capsys, "config", "-vv")
    assert code == 0
    assert rows(out)["password"] == ("set", "MAILSPOOL_PASSWORD")
    code, out, err = run(capsys, "config", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["settings"]["password"] == {"set": True, "origin": "MAILSPOOL_PASSWORD"}
    assert shown["settings"]["username"] == {"value": "app", "origin": "MAILSPOOL_USERNAME"}
    assert secret not in out + err

    pwfile = tmp_path / "pw"
    pwfile.write_text(secret + "\n")
    monkeypatch.delenv("MAILSPOOL_PASSWORD")
    code, out, err = run(capsys, "config", "--json", "--password-file", str(pwfile))
    assert code == 0, err
    origin = json.loads(out)["settings"]["password"]["origin"]
    assert origin == f"--password-file ({pwfile})"
    assert secret not in out + err


def test_config_json_values_and_default_port(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "config", "--json", "--tls", "implicit", "--rate-limit", "2.5")
    assert code == 0
    shown = json.loads(out)
    assert (shown["config_file"], shown["config_origin"]) == (None, None)
    s = shown["settings"]
    assert s["port"] == {"value": 465, "origin": "default"}
    assert s["tls"] == {"value": "implicit", "origin": "--tls"}
    assert s["rate_limit"] == {"value": 2.5, "origin": "--rate-limit"}
    assert s["first_delay"] == {"value": 300.0, "origin": "default"}
    assert s["queue"] == {"value": None, "origin": "default"}


def test_config_with_a_bad_setting_is_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILSPOOL_BACKOFF_FACTOR", "0.5")
    code, out, err = run(capsys, "config")
    assert (code, out) == (2, "")
    want = "backoff_factor: must be at least 1, got 0.5 (from MAILSPOOL_BACKOFF_FACTOR)"
    assert err == f"mailspool: {want}\n"


def test_resolve_settings_names_the_config_flag(tmp_path: Path) -> None:
    conf = tmp_path / "m.toml"
    conf.write_text("[processor]\nconnections = 2\n")
    loaded = resolve_settings({}, {}, config_file=str(conf))
    assert (loaded.config_file, loaded.config_origin) == (str(conf), "--config")
    assert loaded.origin("connections") == f"{conf} [processor] connections"
    assert loaded.origin("host") == "default"


def test_retry_and_relay_pause_settings_reach_the_processor(tmp_path: Path) -> None:
    # The defaults are the processor's own.
    queue = str(tmp_path / "spool")
    Spool(queue)
    assert make_processor(Settings(queue=queue)).retry == RetryPolicy()

    s = load_settings(
        {"relay_first_delay": "10s", "backoff_factor": "3"},
        {
            "MAILSPOOL_RELAY_MAX_DELAY": "5m",
            "MAILSPOOL_GIVE_UP_AFTER": "2d",
            "MAILSPOOL_QUEUE": queue,
        },
    )
    processor = make_processor(s)
    assert processor.retry == RetryPolicy(
        factor=3.0, give_up_after=172800.0, relay_first_delay=10.0, relay_max_delay=300.0
    )
    assert processor.retry.relay_delay(2) == 30.0  # 10s, times the factor
    assert processor.connections == s.connections


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        ({"relay_first_delay": "0"}, "relay_first_delay"),
        ({"relay_first_delay": "20m"}, "relay_max_delay"),
        ({"relay_max_delay": "soon"}, "relay_max_delay"),
        ({"backoff_factor": "0.9"}, "backoff_factor"),
        ({"backoff_factor": "twice"}, "backoff_factor"),
    ],
)
def test_bad_retry_settings(flags: dict[str, object], setting: str) -> None:
    from mailspool.cli.settings import ConfigError

    with pytest.raises(ConfigError) as info:
        load_settings(flags, {})
    assert info.value.setting == setting
    assert "\n" not in str(info.value)


def test_every_setting_has_its_flag_and_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    docs = DOCS.read_text()
    assert main(["run", "--help"]) == 0
    run_help = capsys.readouterr().out
    assert main(["config", "--help"]) == 0
    config_help = capsys.readouterr().out
    for f in FIELDS:
        if f.flag is not None:
            assert f.flag in run_help, f.flag
            assert f.flag in config_help, f.flag
            assert f"`{f.flag}" in docs, f.flag
        assert f.env is not None and f"`{f.env}`" in docs, f.env
        key = f"[{f.table}] {f.name}" if f.table else f.name
        assert f"`{key}`" in docs, key
