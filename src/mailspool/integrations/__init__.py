"""Glue for web frameworks, each an optional extra of the package.

* :mod:`mailspool.integrations.zope`: the ``mail:`` ZCML directives
  (``pip install mailspool[zope]``).
* :mod:`mailspool.integrations.pyramid`: ``config.include()``, a mailer per
  registry, ``request.mailer`` (``pip install mailspool[pyramid]``).
* :mod:`mailspool.integrations.django`: an ``EMAIL_BACKEND`` that queues when
  Django's transaction commits, and ``manage.py mailspool_run``
  (``pip install mailspool[django]``).
* :mod:`mailspool.integrations.flask`: an extension that queues the mail of a
  request only when the request succeeds, and ``flask mailspool run``
  (``pip install mailspool[flask]``).

Each imports its framework only when it is imported itself; the rest of
mailspool never imports anything from here.
"""
