"""The Maildir queue backend: durable files, claims by ``flock``, the state table.

:mod:`~mailspool.maildir.spool` holds :class:`Spool`; the file format is
:mod:`~mailspool.maildir.fileformat` (and :mod:`~mailspool.maildir.legacy` for
zope.sendmail and repoze.sendmail files); which state may become which is
:mod:`~mailspool.maildir.lifecycle`. Nothing here knows SMTP.
"""
