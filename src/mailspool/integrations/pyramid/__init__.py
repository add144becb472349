"""Pyramid: what pyramid_mailer gives, delivered by mailspool.

::

    config.include("mailspool.integrations.pyramid")   # reads mail.* settings
    config.include("pyramid_tm")                        # send() at commit

    def view(request):
        request.mailer.send_to_queue(Message(subject="Hi", recipients=[...], body="..."))

:func:`includeme` makes one :class:`Mailer` from the settings (prefix
``mail.``, or the value of ``mailspool.prefix`` or ``pyramid_mailer.prefix``)
and registers it; ``request.mailer`` and :func:`get_mailer` return it, bound
to the request's transaction manager (``request.tm``, from pyramid_tm) when
there is one.  Tests include :mod:`mailspool.integrations.pyramid.testing`
instead, whose mailer keeps what is sent in an ``outbox``.
"""

from __future__ import annotations

from typing import Any

from mailspool.integrations.pyramid.mailer import IPyramidMailer, Mailer, settings_kwargs
from mailspool.integrations.pyramid.message import Attachment, Message

__all__ = [
    "Attachment",
    "IPyramidMailer",
    "Mailer",
    "Message",
    "get_mailer",
    "includeme",
    "mailer_factory_from_settings",
    "settings_kwargs",
]


def mailer_factory_from_settings(settings: Any, prefix: str = "mail.") -> Mailer:
    """A :class:`Mailer` from Pyramid settings (pyramid_mailer's name)."""
    return Mailer.from_settings(settings, prefix)


def includeme(config: Any) -> None:
    """Register the registry's mailer from the settings, and ``request.mailer``.

    Raises:
        pyramid.exceptions.ConfigurationError: a setting cannot be read
            (the message names it).
    """
    from pyramid.exceptions import ConfigurationError

    settings = config.registry.settings or {}
    prefix = settings.get("mailspool.prefix") or settings.get("pyramid_mailer.prefix") or "mail."
    try:
        mailer = mailer_factory_from_settings(settings, prefix)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    set_mailer(config, mailer)
    if mailer.processor_thread is not None:
        mailer.processor_thread.start()


def set_mailer(config: Any, mailer: Any) -> None:
    """Make ``mailer`` the registry's mailer and add ``request.mailer``."""
    config.registry.registerUtility(mailer, IPyramidMailer)
    config.add_request_method(get_mailer, "mailer", reify=True)


def get_mailer(request: Any) -> Any:
    """The registry's mailer, bound to ``request.tm`` when pyramid_tm is active.

    ``request`` may also be a registry.
    """
    registry = getattr(request, "registry", request)
    mailer = registry.getUtility(IPyramidMailer)
    tm = getattr(request, "tm", None)
    if tm is not None:
        mailer = mailer.bind(transaction_manager=tm)
    return mailer
