"""Glue for web frameworks, each an optional extra of the package.

* :mod:`mailspool.integrations.zope`: the ``mail:`` ZCML directives
  (``pip install mailspool[zope]``).
* :mod:`mailspool.integrations.pyramid`: ``config.include()``, a mailer per
  registry, ``request.mailer`` (``pip install mailspool[pyramid]``).

Each imports its framework only when it is imported itself; the rest of
mailspool never imports anything from here.
"""
