"""mailspool: send email only when the transaction commits, through a crash-safe spool.

The public names live here; interfaces, events and errors in
:mod:`mailspool.interfaces`, :mod:`mailspool.events` and :mod:`mailspool.errors`.
"""

from __future__ import annotations

from mailspool.delivery import DirectMailDelivery, QueuedMailDelivery
from mailspool.mailer import SendmailMailer, SendResult, SMTPMailer
from mailspool.message import Envelope, make_msgid
from mailspool.processor import QueueProcessor, RetryPolicy
from mailspool.spool import Spool

__all__ = [
    "DirectMailDelivery",
    "Envelope",
    "QueueProcessor",
    "QueuedMailDelivery",
    "RetryPolicy",
    "SMTPMailer",
    "SendResult",
    "SendmailMailer",
    "Spool",
    "make_msgid",
]

__version__ = "0.1.0"
