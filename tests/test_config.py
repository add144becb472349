"""Settings: precedence, conversion, validation, and the password's rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailspool.cli.settings import FIELDS, ConfigError, Settings, load_settings, parse_duration


def write(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_defaults_need_nothing() -> None:
    s = load_settings({}, {})
    assert s == Settings()
    assert s.host == "localhost" and s.tls == "starttls" and s.relay_port == 25
    assert s.verify_certificates is True
    assert (s.first_delay, s.max_delay, s.give_up_after) == (300.0, 3600.0, 5 * 86400.0)


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "m.toml",
        'queue = "spool"\n[relay]\nhost = "file.example"\nport = 2500\ntls = "implicit"\n'
        "timeout = 10\n[processor]\nconnections = 7\n",
    )
    env = {"MAILSPOOL_PORT": "2600", "MAILSPOOL_TIMEOUT": "20s", "MAILSPOOL_CONNECTIONS": ""}
    s = load_settings({"port": "2700"}, env, config_file=conf)
    assert s.host == "file.example"  # file only
    assert s.tls == "implicit"  # file only
    assert s.port == 2700  # flag beats env and file
    assert s.timeout == 20.0  # env beats file
    assert s.connections == 7  # an empty variable counts as unset
    assert s.interval == 3.0  # default
    # A relative path in the file is relative to the file.
    assert s.queue == str(tmp_path / "spool")


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    conf = write(tmp_path / "m.toml", '[relay]\nhost = "env-file.example"\n')
    assert load_settings({}, {"MAILSPOOL_CONFIG": conf}).host == "env-file.example"


def test_implicit_tls_defaults_to_port_465() -> None:
    assert load_settings({"tls": "implicit"}, {}).relay_port == 465
    assert load_settings({"tls": "IMPLICIT", "port": "2465"}, {}).relay_port == 2465


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), ("45", 45.0), ("90s", 90.0), ("5m", 300.0), ("1.5h", 5400.0), ("5d", 432000.0)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("flags", "env", "setting", "origin"),
    [
        ({"port": "abc"}, {}, "port", "--port"),
        ({}, {"MAILSPOOL_PORT": "70000"}, "port", "MAILSPOOL_PORT"),
        ({"tls": "ssl"}, {}, "tls", "--tls"),
        ({}, {"MAILSPOOL_GIVE_UP_AFTER": "5 weeks"}, "give_up_after", "MAILSPOOL_GIVE_UP_AFTER"),
        ({"connections": "0"}, {}, "connections", "--connections"),
        ({"rate_limit": "-1"}, {}, "rate_limit", "--rate-limit"),
        ({"interval": "0"}, {}, "interval", "--interval"),
        ({"max_delay": "1m"}, {}, "max_delay", "--max-delay"),
        ({"verify_certificates": "maybe"}, {}, "verify_certificates", "--no-verify-certificates"),
        ({"ca_file": "/nonexistent/ca.pem"}, {}, "ca_file", "--ca-file"),
    ],
)
def test_bad_setting_is_one_line_naming_it(
    flags: dict[str, object], env: dict[str, str], setting: str, origin: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(flags, env)
    err = info.value
    assert err.setting == setting
    text = str(err)
    assert text.startswith(f"{setting}: ")
    assert f"(from {origin})" in text
    assert "\n" not in text


def test_username_and_password_go_together() -> None:
    with pytest.raises(ConfigError, match=r"^password: a username is set but no password"):
        load_settings({"username": "app"}, {})
    with pytest.raises(ConfigError, match=r"^username: "):
        load_settings({}, {"MAILSPOOL_PASSWORD": "pw"})


def test_no_auth_in_clear_text_unless_allowed() -> None:
    env = {"MAILSPOOL_USERNAME": "app", "MAILSPOOL_PASSWORD": "pw"}
    with pytest.raises(ConfigError, match=r"^tls: .*clear text"):
        load_settings({"tls": "none"}, env)
    s = load_settings({"tls": "none", "allow_plaintext_auth": "true"}, env)
    assert s.allow_plaintext_auth and s.password == "pw"


def test_password_is_never_a_flag() -> None:
    with pytest.raises(ConfigError, match="never taken from the command line"):
        load_settings({"password": "hunter2"}, {})
    assert all(f.flag is None for f in FIELDS if f.name == "password")


def test_password_file_flag_beats_environment(tmp_path: Path) -> None:
    pw = write(tmp_path / "pw", "from-file\n")
    s = load_settings({"username": "app", "password_file": pw}, {"MAILSPOOL_PASSWORD": "from-env"})
    assert s.password == "from-file"  # one trailing newline dropped
    s = load_settings({"username": "app"}, {"MAILSPOOL_PASSWORD_FILE": pw})
    assert s.password == "from-file"
    with pytest.raises(ConfigError, match="both MAILSPOOL_PASSWORD and"):
        load_settings(
            {"username": "app"},
            {"MAILSPOOL_PASSWORD_FILE": pw, "MAILSPOOL_PASSWORD": "x"},
        )
    empty = write(tmp_path / "empty", "")
    with pytest.raises(ConfigError, match=r"^password_file: .* is empty \(from --password-file\)"):
        load_settings({"username": "app", "password_file": empty}, {})


def test_password_never_in_repr_or_errors(tmp_path: Path) -> None:
    secret = "Sup3r-S3cret"
    s = load_settings({"username": "app"}, {"MAILSPOOL_PASSWORD": secret})
    assert secret not in repr(s)
    assert secret not in str(s)
    assert s.public()["password"] == "***"
    assert s.mailer_options()["password"] == secret
    with pytest.raises(ConfigError) as info:
        load_settings({"username": "app", "port": "x"}, {"MAILSPOOL_PASSWORD": secret})
    assert secret not in str(info.value)


def test_world_readable_config_with_password_is_refused(tmp_path: Path) -> None:
    text = '[relay]\nusername = "app"\npassword = "hunter2"\n'
    conf = write(tmp_path / "m.toml", text, 0o644)
    with pytest.raises(ConfigError) as info:
        load_settings({}, {}, config_file=conf)
    msg = str(info.value)
    assert msg.startswith("config: ") and "readable by group or others" in msg
    assert "hunter2" not in msg and "\n" not in msg
    # Group-readable is refused too.
    os.chmod(conf, 0o640)
    with pytest.raises(ConfigError, match="readable by group or others"):
        load_settings({}, {}, config_file=conf)
    # Owner-only is fine.
    os.chmod(conf, 0o600)
    assert load_settings({}, {}, config_file=conf).password == "hunter2"
    # A readable file without a password is fine too.
    other = write(tmp_path / "n.toml", '[relay]\nhost = "x.example"\n', 0o644)
    assert load_settings({}, {}, config_file=other).host == "x.example"


def test_password_file_in_config_is_relative_to_it(tmp_path: Path) -> None:
    write(tmp_path / "secret", "pw-in-file")
    conf = write(
        tmp_path / "m.toml", '[relay]\nusername = "app"\npassword_file = "secret"\n', 0o644
    )
    assert load_settings({}, {}, config_file=conf).password == "pw-in-file"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[relay]\nhots = 'x'\n", r"unknown setting \[relay\] hots"),
        ("colour = 'blue'\n", "unknown setting colour"),
        ("[smtp]\nhost = 'x'\n", r"unknown setting \[smtp\]"),
        ("[relay\nhost = 'x'\n", "invalid TOML"),
    ],
)
def test_bad_config_file(tmp_path: Path, text: str, match: str) -> None:
    conf = write(tmp_path / "m.toml", text)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings({}, {}, config_file=conf)
    assert info.value.setting == "config"
    assert "\n" not in str(info.value)


def test_bad_value_in_file_names_file_and_key(tmp_path: Path) -> None:
    conf = write(tmp_path / "m.toml", "[retry]\nfirst_delay = 'soon'\n")
    with pytest.raises(ConfigError) as info:
        load_settings({}, {}, config_file=conf)
    assert str(info.value).startswith("first_delay: not a duration")
    assert f"(from {conf} [retry] first_delay)" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: cannot read .*No such file"):
        load_settings({}, {}, config_file=str(tmp_path / "missing.toml"))


def test_settings_are_frozen_keyword_only_and_validated() -> None:
    s = Settings(host="relay.example", port=587)
    with pytest.raises(AttributeError):
        s.port = 25  # type: ignore[misc]
    with pytest.raises(TypeError):
        Settings("relay.example")  # type: ignore[misc]
    assert s.validate() is s
    with pytest.raises(ConfigError, match=r"^port: must be between"):
        Settings(port=0).validate()
    with pytest.raises(ConfigError, match=r"^connections: expected int"):
        Settings(connections="4").validate()  # type: ignore[arg-type]
    assert Settings(timeout=5).validate().timeout == 5  # an int is a fine float


@pytest.mark.parametrize(
    ("text", "setting", "expected"),
    [
        ('[relay]\nverify_certificates = "no"\n', "verify_certificates", "true or false"),
        ('[relay]\nverify_certificates = "false"\n', "verify_certificates", "true or false"),
        ("[relay]\nverify_certificates = 0\n", "verify_certificates", "true or false"),
        ('[relay]\nallow_plaintext_auth = "yes"\n', "allow_plaintext_auth", "true or false"),
        ('[relay]\npipelining = "off"\n', "pipelining", "true or false"),
        ('[relay]\nport = "25"\n', "port", "an integer"),
        ("[processor]\nconnections = 4.5\n", "connections", "an integer"),
        ("[processor]\nrate_limit = true\n", "rate_limit", "a number"),
        ('[processor]\nrate_limit = "20"\n', "rate_limit", "a number"),
        ("[retry]\nfirst_delay = true\n", "first_delay", "a duration"),
        ("[relay]\nhost = 25\n", "host", "a string"),
    ],
)
def test_a_toml_value_of_the_wrong_type_is_refused(
    tmp_path: Path, text: str, setting: str, expected: str
) -> None:
    conf = write(tmp_path / "m.toml", text)
    with pytest.raises(ConfigError) as info:
        load_settings({}, {}, config_file=conf)
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: expected {expected}")
    assert f"(from {conf} [" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["flase", "ture", "disabled", "n", "-1", "2"])
@pytest.mark.parametrize(
    "variable",
    [
        "MAILSPOOL_VERIFY_CERTIFICATES",
        "MAILSPOOL_ALLOW_PLAINTEXT_AUTH",
        "MAILSPOOL_PIPELINING",
    ],
)
def test_a_boolean_typo_in_the_environment_never_changes_a_setting(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match="not a boolean"):
        load_settings({}, {variable: value})


def test_booleans_that_are_spelled_right_still_work(tmp_path: Path) -> None:
    conf = write(tmp_path / "m.toml", "[relay]\nverify_certificates = false\npipelining = false\n")
    s = load_settings({}, {}, config_file=conf)
    assert (s.verify_certificates, s.pipelining) == (False, False)
    s = load_settings({}, {"MAILSPOOL_VERIFY_CERTIFICATES": "no"}, config_file=conf)
    assert s.verify_certificates is False
    s = load_settings({"verify_certificates": "true"}, {}, config_file=conf)
    assert s.verify_certificates is True


def test_the_command_refuses_a_string_for_verify_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailspool.cli.main import main

    conf = write(tmp_path / "m.toml", '[relay]\nverify_certificates = "no"\n')
    code = main(["drain", "--config", conf, "--queue", str(tmp_path / "q")])
    assert code == 2
    assert capsys.readouterr().err == (
        "mailspool: verify_certificates: expected true or false (a TOML boolean, unquoted), "
        f"got the string 'no' (from {conf} [relay] verify_certificates)\n"
    )
    assert not (tmp_path / "q").exists()
