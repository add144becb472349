"""The queue processor as a framework's command runs it: settings from the app's config.

The Django management command and the Flask CLI command both run the same
processor as ``mailspool run``.  Its settings come from the sources that
command reads (``MAILSPOOL_*`` environment variables, the TOML file named by
``MAILSPOOL_CONFIG``, the defaults), with the application's own settings on
top: the spool its deliveries write to, and a mapping of relay and processor
settings spelled as in the TOML file (``{"host": ..., "port": 587, "tls":
"starttls", "username": ..., "password": ...}``).  Every value is converted
and checked by the same code as the command's, and a bad one is reported in
one line that names the application setting it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from mailspool import QueueProcessor, RetryPolicy, Summary
from mailspool.cli.settings import (
    FIELDS,
    PASSWORD_FILE_ENV,
    ConfigError,
    Settings,
    resolve_settings,
)
from mailspool.queue import is_postgres_url

if TYPE_CHECKING:
    from mailspool.queue import QueueBackend

__all__ = ["ConfigError", "load_processor_settings", "make_processor", "run_processor"]

_QUEUE_ENV = "MAILSPOOL_QUEUE"
_ENV_OF = {f.name: f.env for f in FIELDS if f.env}


def _as_env(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)  # type: ignore[no-any-return]
    raise ConfigError("", f"expected a string, a number or a boolean, got {value!r}")


def load_processor_settings(
    queue: str | os.PathLike[str],
    relay: Mapping[str, object] | None = None,
    *,
    config_file: str | None = None,
    where: str = "MAILSPOOL_RELAY",
    queue_where: str = "MAILSPOOL_QUEUE_PATH",
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """The processor's settings: the application's over the environment over the TOML file.

    Args:
        queue: the spool directory the application's deliveries write to.
        relay: settings by their TOML names (``host``, ``port``, ``tls``,
            ``username``, ``password`` or ``password_file``, ``connections``,
            ``first_delay``...); ``None`` values count as unset.
        config_file: a TOML file (default: ``MAILSPOOL_CONFIG`` from the
            environment).
        where: how the application calls ``relay``, for error messages.
        queue_where: how the application calls ``queue``, for error messages.
        environ: the environment (default ``os.environ``).

    Raises:
        ConfigError: one line naming the setting and where its value came from.
    """
    env = dict(os.environ if environ is None else environ)
    labels = {_QUEUE_ENV: queue_where}
    env[_QUEUE_ENV] = os.fspath(queue)
    for name, value in (relay or {}).items():
        if name == "queue":
            raise ConfigError(f"{where}['queue']", f"set the spool with {queue_where}")
        if name == "password_file":
            key = PASSWORD_FILE_ENV
            env.pop("MAILSPOOL_PASSWORD", None)
        elif name in _ENV_OF:
            key = _ENV_OF[name]
            if name == "password":
                env.pop(PASSWORD_FILE_ENV, None)
        else:
            raise ConfigError(f"{where}[{name!r}]", "is not a setting of the processor")
        if value is None:
            env.pop(key, None)
            continue
        try:
            env[key] = _as_env(value)
        except ConfigError as exc:
            raise ConfigError(name, exc.problem, f"{where}[{name!r}]") from None
        labels[key] = f"{where}[{name!r}]"
    try:
        return resolve_settings({}, env, config_file=config_file).settings
    except ConfigError as exc:
        if exc.origin is not None and exc.origin.split(" ")[0] in labels:
            first, _, rest = exc.origin.partition(" ")
            raise ConfigError(exc.setting, exc.problem, f"{labels[first]} {rest}".strip()) from None
        raise


def make_processor(settings: Settings) -> QueueProcessor:
    """A processor of the existing spool ``settings.queue``, with an SMTP mailer.

    Raises:
        ConfigError: the mailer or the processor refuses a setting, or the
            spool does not exist or cannot be opened.
    """
    from mailspool import SMTPMailer, Spool
    from mailspool.errors import SpoolError

    try:
        mailer = SMTPMailer(**settings.mailer_options())
        retry = RetryPolicy(**settings.retry_options())
    except ValueError as exc:
        raise ConfigError("relay", str(exc)) from None
    path = settings.queue or ""
    spool: QueueBackend
    if is_postgres_url(path):  # a PostgreSQL queue
        from mailspool.postgres.queue import PostgresQueue

        try:
            spool = PostgresQueue(path)
        except (SpoolError, ValueError) as exc:
            raise ConfigError("queue", str(exc)) from None
        return QueueProcessor(spool, mailer, retry=retry, **settings.processor_options())
    if not os.path.isdir(path):
        raise ConfigError("queue", f"{path}: not found (nothing was ever queued there?)")
    try:
        spool = Spool(path, create=False)
    except (SpoolError, OSError) as exc:
        raise ConfigError("queue", f"{path}: {exc}") from None
    return QueueProcessor(spool, mailer, retry=retry, **settings.processor_options())


def run_processor(settings: Settings, *, once: bool) -> Summary | None:
    """Deliver the queue: one pass (``once``), or until SIGTERM/SIGINT.

    Returns:
        The pass's summary with ``once``; ``None`` after a stop.

    Raises:
        ConfigError: as :func:`make_processor`.
    """
    processor = make_processor(settings)
    if not once:
        processor.run()
        return None
    with processor:  # closes the connections; messages in flight are settled
        return processor.process_once()
