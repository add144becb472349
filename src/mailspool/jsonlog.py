"""Log records as JSON lines, for Loki, Elasticsearch and the like.

One JSON object per record, always with ``time`` (UTC, ISO 8601),
``level``, ``logger`` and ``message``; a delivery attempt's record (it
carries an :class:`~mailspool.events.Attempt`) adds ``queue_id``,
``message_id``, ``domains``, ``outcome``, ``reason``, ``code``, ``relay``,
``duration`` (the SMTP transaction, seconds), ``since_commit`` (seconds)
and ``attempt``; a record with an exception adds ``error`` (and
``traceback`` when asked for).

Addresses: unless ``addresses`` is set, every ``local@domain`` in the
message is written ``*@domain``, at every level, so that a log shipped
elsewhere holds no one's address.  No other attribute of a record is
written, so nothing an application attached to a record leaks either (and
mailspool never logs a password).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import traceback
from typing import Any

from mailspool.events import Attempt

__all__ = ["KEYS", "JsonFormatter", "scrub"]

#: The keys of a delivery attempt's record, in the order written.
KEYS = (
    "queue_id",
    "message_id",
    "domains",
    "outcome",
    "reason",
    "code",
    "relay",
    "duration",
    "since_commit",
    "attempt",
)

# A local part is anything up to the "@" that is not a separator of the
# texts that carry addresses (log lines, SMTP replies): spaces, <>, commas...
# or a quoted local part.
_ADDRESS = re.compile(r"""(?:"(?:[^"\\\n]|\\.)*"|[^\s<>()\[\],;:"'@]+)@(?=[^\s@])""")


def scrub(text: str) -> str:
    """``text`` with the local part of each address replaced by ``*``."""
    return _ADDRESS.sub("*@", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's documentation).

    Args:
        addresses: keep full addresses in messages.
        tracebacks: add the formatted traceback of a record's exception.
    """

    def __init__(self, *, addresses: bool = False, tracebacks: bool = False) -> None:
        super().__init__()
        self.addresses = addresses
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        message = record.getMessage()
        obj: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": message if self.addresses else scrub(message),
        }
        facts = getattr(record, "attempt", None)
        if isinstance(facts, Attempt):
            obj.update(
                queue_id=facts.queue_id,
                message_id=facts.message_id,
                domains=list(facts.domains),
                outcome=facts.outcome,
                reason=facts.reason,
                code=facts.code,
                relay=facts.relay,
                duration=None if facts.smtp_seconds is None else round(facts.smtp_seconds, 6),
                since_commit=round(facts.since_commit, 3),
                attempt=facts.attempt,
            )
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            obj["error"] = error if self.addresses else scrub(error)
            if self.tracebacks:
                tb = "".join(traceback.format_exception(*record.exc_info))
                obj["traceback"] = tb if self.addresses else scrub(tb)
        return json.dumps(obj, ensure_ascii=False)
