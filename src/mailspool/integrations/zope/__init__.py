"""The ``mail:`` ZCML directives, as zope.sendmail users know them.

Replace ``<include package="zope.sendmail" file="meta.zcml" />`` with
``<include package="mailspool.integrations.zope" file="meta.zcml" />``; the
``mail:smtpMailer``, ``mail:sendmailMailer``, ``mail:queuedDelivery`` and
``mail:directDelivery`` directives then register mailspool's mailers and
deliveries, found with ``getUtility(IMailDelivery, name)`` where
``IMailDelivery`` comes from :mod:`mailspool.interfaces`.  The directives
are in :mod:`mailspool.integrations.zope.zcml`; docs/frameworks.md has
the details.
"""

from __future__ import annotations

from mailspool.integrations.zope.zcml import (
    NO_THREAD_ENV,
    processor_threads,
    stop_processor_threads,
)

__all__ = ["NO_THREAD_ENV", "processor_threads", "stop_processor_threads"]
