"""SMTP: the protocol, the socket and TLS transport, and the mailers that use them.

:mod:`~mailspool.smtp.mailer` holds :class:`SMTPMailer`; a session is
:mod:`~mailspool.smtp.session`, opened by :mod:`~mailspool.smtp.handshake`;
what a message needs of the relay is :mod:`~mailspool.smtp.esmtp`; what a
mailer reports is :mod:`~mailspool.smtp.result`; :mod:`~mailspool.smtp.sendmail`
hands mail to a local MTA. Nothing here knows the queue.
"""
