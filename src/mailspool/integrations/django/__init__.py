"""Django: an ``EMAIL_BACKEND`` that queues into a mailspool spool when the database commits.

Add ``"mailspool.integrations.django"`` to ``INSTALLED_APPS`` (for the
``mailspool_run`` management command) and set::

    EMAIL_BACKEND = "mailspool.integrations.django.EmailBackend"
    MAILSPOOL_QUEUE_PATH = "/var/spool/myapp-mail"

See :mod:`mailspool.integrations.django.backend` for what is written when,
and docs/frameworks.md for the settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailspool.integrations.django.backend import EmailBackend

__all__ = ["EmailBackend"]


def __getattr__(name: str) -> Any:
    # Lazy, so that listing the app in INSTALLED_APPS imports nothing of
    # django.core.mail before Django is set up.
    if name == "EmailBackend":
        from mailspool.integrations.django.backend import EmailBackend

        return EmailBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
