"""mailspool: send email only when the transaction commits, through a crash-safe spool.

The public names live here; interfaces, events and errors in
:mod:`mailspool.interfaces`, :mod:`mailspool.events` and :mod:`mailspool.errors`.

Importing the package loads nothing else: each name is imported the first
time it is used (PEP 562), so ``import mailspool`` stays cheap for
applications that only configure it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mailspool.delivery import DirectMailDelivery, QueuedMailDelivery
    from mailspool.maildir.spool import Spool
    from mailspool.message import Envelope, make_msgid
    from mailspool.processor.loop import QueueProcessor
    from mailspool.processor.outcome import Summary
    from mailspool.processor.policy import RetryPolicy
    from mailspool.processor.thread import QueueProcessorThread
    from mailspool.smtp.mailer import SMTPMailer
    from mailspool.smtp.result import Reply, SendResult
    from mailspool.smtp.sendmail import SendmailMailer

# Each public name, and the module that defines it.
_PUBLIC = {
    "DirectMailDelivery": "mailspool.delivery",
    "QueuedMailDelivery": "mailspool.delivery",
    "Envelope": "mailspool.message",
    "make_msgid": "mailspool.message",
    "QueueProcessor": "mailspool.processor.loop",
    "QueueProcessorThread": "mailspool.processor.thread",
    "RetryPolicy": "mailspool.processor.policy",
    "Summary": "mailspool.processor.outcome",
    "Reply": "mailspool.smtp.result",
    "SendResult": "mailspool.smtp.result",
    "SMTPMailer": "mailspool.smtp.mailer",
    "SendmailMailer": "mailspool.smtp.sendmail",
    "Spool": "mailspool.maildir.spool",
}

__all__ = [
    "DirectMailDelivery",
    "Envelope",
    "QueueProcessor",
    "QueueProcessorThread",
    "QueuedMailDelivery",
    "Reply",
    "RetryPolicy",
    "SMTPMailer",
    "SendResult",
    "SendmailMailer",
    "Spool",
    "Summary",
    "make_msgid",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mailspool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup does not come back here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
