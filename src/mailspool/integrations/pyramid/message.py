"""``Message`` and ``Attachment``: pyramid_mailer's message objects, built with :mod:`email`.

The constructor arguments and attributes are pyramid_mailer's (``subject``,
``recipients``, ``body``, ``html``, ``sender``, ``cc``, ``bcc``,
``extra_headers``, ``attachments``); :meth:`Message.to_message` builds an
``email.message.EmailMessage`` with the standard library (plain text, HTML
as its alternative, attachments after them).  Bcc recipients are in the
envelope only, never in a header.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterable, Mapping
from email.message import EmailMessage
from typing import IO, Any

from mailspool.errors import InvalidMessage

__all__ = ["Attachment", "Message"]

Data = str | bytes | IO[str] | IO[bytes]


class Attachment:
    """A file attached to a message, or a body given with its own content type.

    Args:
        filename: the file name shown to the recipient (its directory is dropped).
        content_type: e.g. ``"application/pdf"``; guessed from ``filename``
            when missing, else ``application/octet-stream``.
        data: the content: ``bytes``, ``str`` or a file object (read once).
        disposition: ``"attachment"`` (default) or ``"inline"``.
        transfer_encoding: ``"base64"`` (default for binary data) or
            ``"quoted-printable"``.
        content_id: a Content-ID, to refer to an inline image from HTML.
    """

    def __init__(
        self,
        filename: str | None = None,
        content_type: str | None = None,
        data: Data | None = None,
        disposition: str | None = None,
        transfer_encoding: str | None = None,
        content_id: str | None = None,
    ) -> None:
        self.filename = filename
        self.content_type = content_type
        self.disposition = disposition or "attachment"
        self.transfer_encoding = transfer_encoding
        self.content_id = content_id
        self._data = data

    @property
    def data(self) -> str | bytes | None:
        """The content (a file object given as ``data`` is read on first use)."""
        if self._data is not None and not isinstance(self._data, str | bytes):
            self._data = self._data.read()
        return self._data

    def _type(self) -> tuple[str, str]:
        content_type = self.content_type
        if not content_type and self.filename:
            content_type = mimetypes.guess_type(self.filename)[0]
        main, _, sub = (content_type or "application/octet-stream").partition(";")[0].partition("/")
        return main.strip().lower(), sub.strip().lower() or "octet-stream"

    def add_to(self, message: EmailMessage) -> None:
        """Attach this to ``message`` (a multipart/mixed part is made as needed)."""
        data = self.data
        if not data:
            raise InvalidMessage(f"attachment {self.filename or ''!r} has no data")
        main, sub = self._type()
        options: dict[str, Any] = {"disposition": self.disposition.split(";")[0].strip()}
        if self.filename:
            options["filename"] = os.path.basename(self.filename)
        if self.content_id:
            options["cid"] = self.content_id
        if self.transfer_encoding:
            options["cte"] = self.transfer_encoding
        if isinstance(data, str):
            if main != "text":
                data = data.encode("utf-8")
            else:
                message.add_attachment(data, subtype=sub, **options)
                return
        message.add_attachment(data, maintype=main, subtype=sub, **options)

    def text(self) -> str:
        """The content as text (a body or HTML part given as an ``Attachment``)."""
        data = self.data
        if isinstance(data, bytes):
            return data.decode("utf-8")
        return data or ""


class Message:
    """An email to send with a :class:`~mailspool.integrations.pyramid.Mailer`.

    Args:
        subject: the Subject.
        recipients: the To addresses.
        body: the plain text (a ``str`` or an :class:`Attachment`).
        html: the HTML (a ``str`` or an :class:`Attachment`); with ``body``
            it becomes its multipart/alternative.
        sender: the From address (default: the mailer's ``default_sender``).
        cc: the Cc addresses.
        bcc: addresses that get the message without being named in it.
        extra_headers: further headers, ``{name: value}``.
        attachments: :class:`Attachment` objects.
    """

    def __init__(
        self,
        subject: str | None = None,
        recipients: Iterable[str] | None = None,
        body: str | Attachment | None = None,
        html: str | Attachment | None = None,
        sender: str | None = None,
        cc: Iterable[str] | None = None,
        bcc: Iterable[str] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        attachments: Iterable[Attachment] | None = None,
    ) -> None:
        self.subject = subject or ""
        self.sender = sender
        self.body = body
        self.html = html
        self.recipients = list(recipients or ())
        self.cc = list(cc or ())
        self.bcc = list(bcc or ())
        self.extra_headers = dict(extra_headers or {})
        self.attachments = list(attachments or ())

    def __repr__(self) -> str:
        return f"<Message {self.subject!r} from {self.sender!r} to {self.send_to!r}>"

    @property
    def send_to(self) -> list[str]:
        """Every envelope recipient: To, Cc and Bcc, each once, in that order."""
        return list(dict.fromkeys([*self.recipients, *self.cc, *self.bcc]))

    def add_recipient(self, recipient: str) -> None:
        """Add a To address."""
        self.recipients.append(recipient)

    def add_cc(self, recipient: str) -> None:
        """Add a Cc address."""
        self.cc.append(recipient)

    def add_bcc(self, recipient: str) -> None:
        """Add a Bcc address."""
        self.bcc.append(recipient)

    def attach(self, attachment: Attachment) -> None:
        """Add an :class:`Attachment`."""
        self.attachments.append(attachment)

    def validate(self) -> None:
        """Check that the message can be sent.

        Raises:
            InvalidMessage: no sender, no recipient, neither ``body`` nor
                ``html``, or a line break in a header value.
        """
        if not self.sender:
            raise InvalidMessage("the message has no sender (and the mailer no default_sender)")
        if not self.send_to:
            raise InvalidMessage("the message has no recipients")
        if self.body is None and self.html is None:
            raise InvalidMessage("the message needs a body or html")
        headers = [("Subject", self.subject), ("From", self.sender)]
        headers += [("recipient", address) for address in self.send_to]
        headers += list(self.extra_headers.items())
        for name, value in headers:
            if "\r" in value or "\n" in value:
                raise InvalidMessage(f"line break in the {name} header: {value!r}")

    def to_message(self) -> EmailMessage:
        """The message as an ``email.message.EmailMessage`` (validated first)."""
        self.validate()
        message = EmailMessage()
        message["Subject"] = self.subject
        message["From"] = self.sender
        if self.recipients:
            message["To"] = ", ".join(self.recipients)
        if self.cc:
            message["Cc"] = ", ".join(self.cc)
        for name, value in self.extra_headers.items():
            del message[name]
            message[name] = value
        body, html = (_text(part) for part in (self.body, self.html))
        if body is not None:
            message.set_content(body)
            if html is not None:
                message.add_alternative(html, subtype="html")
        elif html is not None:
            message.set_content(html, subtype="html")
        for attachment in self.attachments:
            attachment.add_to(message)
        return message


def _text(part: str | Attachment | None) -> str | None:
    return part.text() if isinstance(part, Attachment) else part
