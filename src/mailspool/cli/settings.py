"""Settings for the ``mailspool`` command: one frozen object, four sources.

Every setting is declared once, in the table :data:`FIELDS`
(:mod:`mailspool.cli.settings_fields`), with its TOML table and key, its
environment variable and its command-line flag, so the loader, the error
messages ("port: ... (from MAILSPOOL_PORT)") and the documentation cannot
drift apart.  :func:`resolve_settings` also says where each value came from
(``mailspool config`` prints it).

Precedence, highest first: command-line flags, environment variables, the
TOML file, defaults.  Every value is converted and checked by
:func:`load_settings` and :meth:`Settings.validate` before the command
touches anything; a bad value raises :class:`ConfigError`, whose text is one
line naming the setting and where the value came from.

The relay password is a secret with rules of its own: it comes from
``MAILSPOOL_PASSWORD``, from a password file (``--password-file``,
``MAILSPOOL_PASSWORD_FILE`` or ``password_file`` in the TOML file) or from
the TOML file itself, never from a command-line flag (``ps`` shows every
process's arguments).  A TOML file that holds a password and is readable by
its group or by others is refused.  The password never appears in a repr,
a log line or an error message.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from mailspool.cli.settings_fields import (
    FIELDS,
    TLS_MODES,
    ConfigError,
    Field,
    check_toml_type,
    field_named,
    parse_duration,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "CONFIG_ENV",
    "FIELDS",
    "PASSWORD_FILE_ENV",
    "TLS_MODES",
    "ConfigError",
    "Field",
    "LoadedSettings",
    "Settings",
    "load_settings",
    "parse_duration",
    "resolve_settings",
]

#: The environment variable naming the TOML file (``--config`` wins over it).
CONFIG_ENV = "MAILSPOOL_CONFIG"
#: The environment variable naming a file that holds the password.
PASSWORD_FILE_ENV = "MAILSPOOL_PASSWORD_FILE"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the command needs to know, validated.

    Construct with keyword arguments (or through :func:`load_settings`) and
    call :meth:`validate`.  Durations are seconds.  ``password`` is left out
    of the repr.
    """

    queue: str | None = None
    host: str = "localhost"
    port: int | None = None
    tls: str = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    verify_certificates: bool = True
    allow_plaintext_auth: bool = False
    pipelining: bool = True
    local_hostname: str | None = None
    connect_timeout: float = 60.0
    timeout: float = 300.0
    data_timeout: float = 600.0
    connections: int = 16
    interval: float = 3.0
    rate_limit: float | None = None
    first_delay: float = 300.0
    max_delay: float = 3600.0
    backoff_factor: float = 2.0
    give_up_after: float = 5 * 86400.0
    relay_first_delay: float = 30.0
    relay_max_delay: float = 600.0

    @property
    def relay_port(self) -> int:
        """``port``, or the standard port for ``tls`` when none was set."""
        if self.port is not None:
            return self.port
        return 465 if self.tls == "implicit" else 25

    def validate(self) -> Settings:
        """Check every setting and how they fit together.

        Returns:
            ``self``, so that ``Settings(...).validate()`` reads naturally.

        Raises:
            ConfigError: naming the first setting that is wrong.
        """
        self._check_kinds()
        self._check_relay()
        self._check_times()
        self._check_the_rest()
        return self

    def _check_kinds(self) -> None:
        for f in FIELDS:
            value = getattr(self, f.name)
            if value is None and f.optional:
                continue
            kinds = (int, float) if f.kind is float else (f.kind,)
            if not isinstance(value, kinds) or (f.kind is not bool and isinstance(value, bool)):
                raise ConfigError(f.name, f"expected {f.kind.__name__}, got {value!r}")

    def _check_relay(self) -> None:
        if self.tls not in TLS_MODES:
            raise ConfigError("tls", f"must be one of {', '.join(TLS_MODES)}; got {self.tls!r}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ConfigError("port", f"must be between 1 and 65535, got {self.port}")
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigError("host", f"not a host name: {self.host!r}")

    def _check_times(self) -> None:
        for name in (
            "connect_timeout",
            "timeout",
            "data_timeout",
            "interval",
            "first_delay",
            "max_delay",
            "relay_first_delay",
            "relay_max_delay",
        ):
            if not getattr(self, name) > 0:  # NaN too
                raise ConfigError(name, "must be greater than 0")
        if not self.give_up_after > 0:
            raise ConfigError("give_up_after", "must be greater than 0")
        if self.max_delay < self.first_delay:
            raise ConfigError(
                "max_delay",
                f"must not be shorter than first_delay ({self.max_delay:g}s "
                f"< {self.first_delay:g}s)",
            )
        if self.relay_max_delay < self.relay_first_delay:
            raise ConfigError(
                "relay_max_delay",
                f"must not be shorter than relay_first_delay ({self.relay_max_delay:g}s "
                f"< {self.relay_first_delay:g}s)",
            )
        if not self.backoff_factor >= 1:
            raise ConfigError("backoff_factor", f"must be at least 1, got {self.backoff_factor:g}")

    def _check_the_rest(self) -> None:
        if self.connections < 1:
            raise ConfigError("connections", "must be at least 1")
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ConfigError("rate_limit", "must be greater than 0 (leave unset for none)")
        if self.ca_file is not None and not os.access(self.ca_file, os.R_OK):
            raise ConfigError("ca_file", f"cannot read {self.ca_file}")
        if self.password is not None and self.username is None:
            raise ConfigError("username", "a password is set but no username")
        if self.username is not None and self.password is None:
            raise ConfigError(
                "password",
                "a username is set but no password (set MAILSPOOL_PASSWORD or use --password-file)",
            )
        if self.username is not None and self.tls == "none" and not self.allow_plaintext_auth:
            raise ConfigError(
                "tls",
                "'none' would send the password in clear text; use starttls or "
                "implicit, or set allow_plaintext_auth",
            )
        if self.queue is not None and not self.queue:
            raise ConfigError("queue", "empty path")

    def mailer_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`mailspool.mailer.SMTPMailer`."""
        return {
            "host": self.host,
            "port": self.relay_port,
            "username": self.username,
            "password": self.password,
            "tls": self.tls,
            "ca_file": self.ca_file,
            "verify_certificates": self.verify_certificates,
            "allow_plaintext_auth": self.allow_plaintext_auth,
            "pipelining": self.pipelining,
            "local_hostname": self.local_hostname,
            "connect_timeout": self.connect_timeout,
            "timeout": self.timeout,
            "data_timeout": self.data_timeout,
        }

    def retry_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`mailspool.processor.RetryPolicy`."""
        return {
            "first_delay": self.first_delay,
            "factor": self.backoff_factor,
            "max_delay": self.max_delay,
            "give_up_after": self.give_up_after,
            "relay_first_delay": self.relay_first_delay,
            "relay_max_delay": self.relay_max_delay,
        }

    def processor_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`mailspool.processor.QueueProcessor`
        (without ``retry``: build it from :meth:`retry_options`)."""
        return {
            "connections": self.connections,
            "interval": self.interval,
            "rate_limit": self.rate_limit,
        }

    def public(self) -> dict[str, Any]:
        """Every setting as plain values, the password replaced by ``"***"``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "password" and value is not None:
                value = "***"
            out[f.name] = value
        return out


# --- sources ---------------------------------------------------------------------


def _to_str_for(name: str, value: object, origin: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, f"expected a string, got {value!r}", origin)
    return value


def _read_secret_file(path: str, setting: str, origin: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
        raise ConfigError(setting, f"cannot read {path}: {reason}", origin) from None
    # One trailing line end is the file's, not the password's.
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ConfigError(setting, f"{path} is empty", origin)
    return text


def _read_toml(path: str) -> tuple[dict[str, Any], int]:
    """The parsed file and its permission bits; refuses what cannot be read."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError("config", f"{path} is not a regular file")
            raw = f.read()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message never quotes the value, only its position.
        raise ConfigError("config", f"{path}: invalid TOML: {exc}") from None
    return data, stat.S_IMODE(mode)


def _flatten_toml(data: Mapping[str, Any], path: str) -> dict[str, tuple[object, str]]:
    """``{setting: (value, origin)}`` from a parsed file; unknown keys are errors."""
    tables = {f.table for f in FIELDS if f.table}
    known = {(f.table, f.name) for f in FIELDS} | {("relay", "password_file")}
    out: dict[str, tuple[object, str]] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in tables:
            for sub, subvalue in value.items():
                if (key, sub) not in known:
                    raise ConfigError("config", f"{path}: unknown setting [{key}] {sub}")
                out[sub] = (subvalue, f"{path} [{key}] {sub}")
        elif ("", key) in known:
            out[key] = (value, f"{path} {key}")
        else:
            where = f"[{key}]" if isinstance(value, dict) else key
            raise ConfigError("config", f"{path}: unknown setting {where}")
    return out


def _resolve(value: object, base: str | None) -> object:
    if isinstance(value, str) and base is not None and value:
        return os.path.join(base, os.path.expanduser(value))
    return value


@dataclass(frozen=True)
class LoadedSettings:
    """The settings together with where each value came from.

    Attributes:
        settings: the validated :class:`Settings`.
        origins: for each setting that is not at its default, where its value
            came from: a flag (``"--port"``), an environment variable
            (``"MAILSPOOL_PORT"``) or a place in the TOML file
            (``"/etc/m.toml [relay] port"``).  A password read from a file
            names the file, never the password.
        config_file: the TOML file that was read, or ``None``.
        config_origin: how that file was named: ``"--config"`` or
            :data:`CONFIG_ENV`; ``None`` when no file was read.
    """

    settings: Settings
    origins: Mapping[str, str]
    config_file: str | None = None
    config_origin: str | None = None

    def origin(self, name: str) -> str:
        """Where setting ``name`` came from; ``"default"`` when nowhere."""
        return self.origins.get(name, "default")


def load_settings(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    config_file: str | None = None,
) -> Settings:
    """Gather, convert and validate the settings from every source.

    Args:
        flags: values given on the command line, by setting name; ``None``
            values are "not given".  ``password_file`` names a file holding
            the password; there is no ``password`` flag and one is refused.
        environ: the environment (default ``os.environ``); empty variables
            count as unset.
        config_file: the TOML file; default ``MAILSPOOL_CONFIG`` from
            ``environ``; none when neither is set.

    Returns:
        Validated :class:`Settings`.

    Raises:
        ConfigError: one line naming the setting and the source of the bad
            value, for a bad value, an unknown key in the file, an unreadable
            file, or a password in a file that others can read.
    """
    return resolve_settings(flags, environ, config_file=config_file).settings


def resolve_settings(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    config_file: str | None = None,
) -> LoadedSettings:
    """Like :func:`load_settings`, and say where each value came from.

    Args and Raises are those of :func:`load_settings`.

    Returns:
        :class:`LoadedSettings`: the validated settings and their origins.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if v != ""}
    if "password" in flags:
        raise ConfigError("password", "is never taken from the command line; use --password-file")

    values: dict[str, object] = {}
    origins: dict[str, str] = {}
    # Lowest first: each source overwrites what the one before it set.
    path = config_file or env.get(CONFIG_ENV)
    config_origin = None if not path else "--config" if config_file else CONFIG_ENV
    if path:
        _from_file(path, values, origins)
    _from_environment(env, values, origins)
    _from_flags(flags, values, origins)
    converted = _converted(values, origins)
    try:
        settings = Settings(**converted).validate()
    except ConfigError as exc:
        raise exc.with_origin(origins.get(exc.setting)) from None
    return LoadedSettings(settings, dict(origins), path or None, config_origin)


def _from_file(path: str, values: dict[str, object], origins: dict[str, str]) -> None:
    """The settings of the TOML file at ``path``, into ``values`` and ``origins``."""
    data, mode = _read_toml(path)
    base = os.path.dirname(os.path.abspath(path))
    from_file = _flatten_toml(data, path)
    if "password" in from_file and "password_file" in from_file:
        raise ConfigError("password", f"{path} sets both password and password_file")
    if "password" in from_file and mode & 0o044:
        raise ConfigError(
            "config",
            f"{path} holds a password but is readable by group or others "
            f"(mode {mode:04o}); chmod 600 it, or use MAILSPOOL_PASSWORD or "
            "password_file",
        )
    for name, (value, origin) in from_file.items():
        if name == "password_file":
            pw_path = str(_resolve(_to_str_for("password_file", value, origin), base))
            values["password"] = _read_secret_file(pw_path, "password_file", origin)
            origins["password"] = f"{origin} ({pw_path})"
            continue
        try:
            check_toml_type(field_named(name), value)
        except ConfigError as exc:
            raise exc.with_origin(origin) from None
        if field_named(name).path:
            value = _resolve(value, base)
        values[name], origins[name] = value, origin


def _from_environment(
    env: Mapping[str, str], values: dict[str, object], origins: dict[str, str]
) -> None:
    """The settings of the environment, into ``values`` and ``origins``."""
    for f in FIELDS:
        if f.env and f.env in env:
            values[f.name], origins[f.name] = env[f.env], f.env
    if PASSWORD_FILE_ENV in env:
        if "MAILSPOOL_PASSWORD" in env:
            raise ConfigError(
                "password", f"both MAILSPOOL_PASSWORD and {PASSWORD_FILE_ENV} are set"
            )
        pw_path = env[PASSWORD_FILE_ENV]
        values["password"] = _read_secret_file(pw_path, "password_file", PASSWORD_FILE_ENV)
        origins["password"] = f"{PASSWORD_FILE_ENV} ({pw_path})"


def _from_flags(
    flags: Mapping[str, object], values: dict[str, object], origins: dict[str, str]
) -> None:
    """The settings of the command line, into ``values`` and ``origins``."""
    for name, value in flags.items():
        if name == "password_file":
            values["password"] = _read_secret_file(str(value), "password_file", "--password-file")
            origins["password"] = f"--password-file ({value})"
        elif any(f.name == name for f in FIELDS):
            f = field_named(name)
            values[name], origins[name] = value, f.flag or f"--{name.replace('_', '-')}"
        else:
            raise ConfigError(name, "is not a setting")


def _converted(values: dict[str, object], origins: dict[str, str]) -> dict[str, Any]:
    """Each value as its setting's type; an error names where it came from."""
    converted: dict[str, Any] = {}
    for name, value in values.items():
        f = field_named(name)
        if value is None and f.optional:
            converted[name] = None
            continue
        try:
            converted[name] = f.convert(value)
        except ConfigError as exc:
            raise ConfigError(name, exc.problem, origins[name]) from None
    return converted
