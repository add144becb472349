"""The table of settings: how each one is spelled in every source, and how it is read.

Why a table: every setting of the ``mailspool`` command is declared once in
:data:`FIELDS` -- its TOML table and key, its environment variable, its flag,
its converter -- so that :mod:`mailspool.cli.settings` (which merges the sources),
the command's options (:mod:`mailspool.cli.common`) and the documentation
cannot drift apart.  The converters are plain functions: a raw value (a
string from a flag or the environment, any TOML value) in, the setting's
type out, or :class:`ConfigError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from mailspool.errors import MailspoolError

__all__ = [
    "FIELDS",
    "TLS_MODES",
    "ConfigError",
    "Field",
    "check_toml_type",
    "field_named",
    "parse_duration",
]

#: The values ``tls`` may take.
TLS_MODES = ("starttls", "implicit", "none")


class ConfigError(MailspoolError, ValueError):
    """A setting is missing, malformed or out of range.

    ``setting`` names it (``"port"``, ``"config"``...); ``str(error)`` is one
    line that starts with the setting's name and never contains a password.
    """

    def __init__(self, setting: str, problem: str, origin: str | None = None) -> None:
        self.setting = setting
        self.problem = problem
        self.origin = origin
        text = f"{setting}: {problem}"
        if origin:
            text += f" (from {origin})"
        super().__init__(text)

    def with_origin(self, origin: str | None) -> ConfigError:
        """The same error, saying where the value came from."""
        if origin is None or self.origin is not None:
            return self
        return ConfigError(self.setting, self.problem, origin)


# --- conversions ---------------------------------------------------------------

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)?\s*\Z", re.IGNORECASE)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"90"``, ``"90s"``, ``"5m"``,
    ``"1.5h"`` or ``"5d"``.

    Raises:
        ConfigError: (with setting ``"duration"``) for anything else.
    """
    if isinstance(value, bool):
        raise ConfigError("duration", f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            raise ConfigError(
                "duration", f"not a duration: {value!r} (write e.g. 30, 30s, 5m, 2h, 5d)"
            )
        seconds = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    else:
        raise ConfigError("duration", f"not a duration: {value!r}")
    if not math.isfinite(seconds):
        raise ConfigError("duration", f"not a finite duration: {value!r}")
    return seconds


def _to_str(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError("", f"expected a string, got {value!r}")
    return value


def _to_int(value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError("", f"not an integer: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ConfigError("", f"not an integer: {value!r}")


def _to_float(value: object) -> float:
    if isinstance(value, bool):
        raise ConfigError("", f"not a number: {value!r}")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            raise ConfigError("", f"not a number: {value!r}") from None
    else:
        raise ConfigError("", f"not a number: {value!r}")
    if not math.isfinite(result):
        raise ConfigError("", f"not a finite number: {value!r}")
    return result


def _to_duration(value: object) -> float:
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise ConfigError("", exc.problem) from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError("", f"not a boolean: {value!r} (write true or false)")


def _to_tls(value: object) -> str:
    text = _to_str(value).strip().lower()
    if text not in TLS_MODES:
        raise ConfigError("", f"must be one of {', '.join(TLS_MODES)}; got {value!r}")
    return text


@dataclass(frozen=True)
class Field:
    """How one setting is spelled in each source.

    Attributes:
        name: the :class:`Settings` attribute.
        table: the TOML table holding it (``""`` for the top level).
        env: its environment variable, or ``None``.
        flag: its command-line flag, or ``None``.
        kind: the type the setting has once converted.
        convert: turns a raw value (a string from a flag or the environment,
            any TOML value) into the setting's type; raises
            :class:`ConfigError`.
        optional: ``None`` is an allowed value.
        path: a file or directory name, resolved against the TOML file's
            directory when it comes from there.
        help: one line for the documentation.
    """

    name: str
    table: str
    env: str | None
    flag: str | None
    kind: type
    convert: Callable[[object], object]
    optional: bool = False
    path: bool = False
    help: str = ""


#: Every setting, in the order the documentation lists them.  The password
#: has no flag on purpose; see the module docstring.
FIELDS: tuple[Field, ...] = (
    Field("queue", "", "MAILSPOOL_QUEUE", "--queue", str, _to_str, True, True,
          "the spool directory"),
    Field("host", "relay", "MAILSPOOL_HOST", "--host", str, _to_str,
          help="the SMTP relay's host name"),
    Field("port", "relay", "MAILSPOOL_PORT", "--port", int, _to_int, True,
          help="the relay's port (default 25, or 465 with tls = implicit)"),
    Field("tls", "relay", "MAILSPOOL_TLS", "--tls", str, _to_tls,
          help="TLS to the relay: starttls, implicit or none"),
    Field("username", "relay", "MAILSPOOL_USERNAME", "--username", str, _to_str, True,
          help="user name for SMTP AUTH"),
    Field("password", "relay", "MAILSPOOL_PASSWORD", None, str, _to_str, True,
          help="password for SMTP AUTH (never a flag)"),
    Field("ca_file", "relay", "MAILSPOOL_CA_FILE", "--ca-file", str, _to_str, True, True,
          help="CA certificates (PEM) to verify the relay with"),
    Field("verify_certificates", "relay", "MAILSPOOL_VERIFY_CERTIFICATES",
          "--no-verify-certificates", bool, _to_bool,
          help="verify the relay's certificate and host name"),
    Field("allow_plaintext_auth", "relay", "MAILSPOOL_ALLOW_PLAINTEXT_AUTH",
          "--allow-plaintext-auth", bool, _to_bool,
          help="allow AUTH on a connection without TLS"),
    Field("pipelining", "relay", "MAILSPOOL_PIPELINING", "--no-pipelining", bool, _to_bool,
          help="send MAIL, RCPT and DATA at once when the relay offers PIPELINING"),
    Field("local_hostname", "relay", "MAILSPOOL_LOCAL_HOSTNAME", "--local-hostname",
          str, _to_str, True, help="the name sent with EHLO (default: this host's)"),
    Field("connect_timeout", "relay", "MAILSPOOL_CONNECT_TIMEOUT", "--connect-timeout",
          float, _to_duration, help="timeout for connecting (and the greeting)"),
    Field("timeout", "relay", "MAILSPOOL_TIMEOUT", "--timeout", float, _to_duration,
          help="timeout for each reply, the greeting included"),
    Field("data_timeout", "relay", "MAILSPOOL_DATA_TIMEOUT", "--data-timeout",
          float, _to_duration, help="timeout for the reply after the message data"),
    Field("connections", "processor", "MAILSPOOL_CONNECTIONS", "--connections",
          int, _to_int, help="parallel connections to the relay"),
    Field("interval", "processor", "MAILSPOOL_INTERVAL", "--interval", float, _to_duration,
          help="how often `run` looks for due mail"),
    Field("rate_limit", "processor", "MAILSPOOL_RATE_LIMIT", "--rate-limit",
          float, _to_float, True, help="at most this many messages per second"),
    Field("first_delay", "retry", "MAILSPOOL_FIRST_DELAY", "--first-delay",
          float, _to_duration, help="delay before the first retry"),
    Field("max_delay", "retry", "MAILSPOOL_MAX_DELAY", "--max-delay", float, _to_duration,
          help="longest delay between retries"),
    Field("backoff_factor", "retry", "MAILSPOOL_BACKOFF_FACTOR", "--backoff-factor",
          float, _to_float, help="each further delay is this many times the one before"),
    Field("give_up_after", "retry", "MAILSPOOL_GIVE_UP_AFTER", "--give-up-after",
          float, _to_duration, help="fail what is still undelivered this long after queueing"),
    Field("relay_first_delay", "retry", "MAILSPOOL_RELAY_FIRST_DELAY", "--relay-first-delay",
          float, _to_duration,
          help="pause of the relay after it could not be used (no connection, 421, TLS, AUTH)"),
    Field("relay_max_delay", "retry", "MAILSPOOL_RELAY_MAX_DELAY", "--relay-max-delay",
          float, _to_duration, help="longest pause of an unavailable relay"),
    Field("quick_retry", "retry", "MAILSPOOL_QUICK_RETRY", "--quick-retry",
          float, _to_duration,
          help="wait before the retry, in the same pass, after a one-off fault"),
    Field("jitter", "retry", "MAILSPOOL_JITTER", "--jitter", float, _to_float,
          help="retries are spread over up to this fraction of their delay (0 to 1)"),
)  # fmt: skip


def _toml_kind(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return f"a TOML {type(value).__name__}"


def check_toml_type(f: Field, value: object) -> None:
    """Refuse a TOML value of the wrong type for setting ``f``, before it is converted.

    The environment can only hold strings, so ``"no"`` there means false;
    TOML has real booleans and numbers, and ``verify_certificates = "no"``
    or ``port = "25"`` is a mistake: read leniently, a typo could turn a
    security setting off.

    Raises:
        ConfigError: naming the setting and the type it takes.
    """
    if f.kind is bool:
        ok, expected = isinstance(value, bool), "true or false (a TOML boolean, unquoted)"
    elif f.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer (unquoted)"
    elif f.convert is _to_duration:
        ok = isinstance(value, (int, float, str)) and not isinstance(value, bool)
        expected = 'a duration (a number of seconds, or a string such as "5m")'
    elif f.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number (unquoted)"
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f.name, f"expected {expected}, got {_toml_kind(value)}")


_BY_NAME = {f.name: f for f in FIELDS}


def field_named(name: str) -> Field:
    """The :class:`Field` of setting ``name``.

    Raises:
        KeyError: there is no such setting.
    """
    return _BY_NAME[name]
