"""The Django app that brings the ``mailspool_run`` management command."""

from __future__ import annotations

from django.apps import AppConfig


class MailspoolConfig(AppConfig):  # type: ignore[misc]
    """``mailspool.integrations.django`` in ``INSTALLED_APPS``; it has no models."""

    name = "mailspool.integrations.django"
    label = "mailspool"
    verbose_name = "mailspool"
