"""Flask: mail sent while a request is handled is queued only if the request succeeds.

::

    app.config["MAILSPOOL_QUEUE_PATH"] = "/var/spool/myapp-mail"
    app.config["MAILSPOOL_DEFAULT_SENDER"] = "MyApp <noreply@example.org>"
    mail = Mailspool(app)          # or Mailspool() and later mail.init_app(app)

    @app.post("/signup")
    def signup():
        ...
        mail.send_mail("Welcome", "Hello!", to=[address])
        return redirect(...)

Theory of operation
-------------------
The extension begins a transaction of the ``transaction`` package when a
request starts, and ends it when the response is ready: a response with a
status below 400 commits it (the mail is written durably into the spool
before the response leaves), a 4xx or 5xx response -- or an exception the
view did not handle -- aborts it, and nothing is queued (the rule of
pyramid_tm).  Any other resource joined to the same transaction (a database
through zope.sqlalchemy, ZODB) commits or aborts with the mail, in one
two-phase commit.  If writing the spool fails, the commit fails, the other
resources roll back, and the request ends in a 500.

``send()`` validates at once: a bad address raises in the view, never at
commit.  Outside a request (the ``flask shell``, a CLI command, a worker),
nothing commits on its own: wrap the sending in ``with mail.transaction():``
(or commit the ``transaction`` package's transaction yourself).  With
``MAILSPOOL_MANAGE_TRANSACTION = False`` the extension leaves transactions
alone, for applications that manage them already.

``flask mailspool run [--once]`` runs the queue processor with the app's
settings (see :mod:`mailspool.integrations._processor`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.message import EmailMessage, Message
from typing import Any

import click
import transaction as _transaction
from flask import Flask, Response, current_app, g, has_request_context
from flask.cli import AppGroup

from mailspool import QueuedMailDelivery
from mailspool.errors import InvalidAddress
from mailspool.integrations._processor import ConfigError, load_processor_settings, run_processor
from mailspool.message import make_envelope, parse_mailbox

__all__ = ["Mailspool"]

_FLAG = "_mailspool_transaction"


@dataclass(frozen=True)
class _State:
    delivery: QueuedMailDelivery
    default_sender: str | None


class Mailspool:
    """The extension: ``Mailspool(app)``, or ``Mailspool()`` then :meth:`init_app`.

    Args:
        app: the Flask application, or ``None`` to call :meth:`init_app` later.
        transaction_manager: the manager whose transactions the mail joins
            and the extension begins and ends per request; default
            ``transaction.manager`` (one transaction per thread).

    Config keys:
        ``MAILSPOOL_QUEUE_PATH`` (required): the spool directory.
        ``MAILSPOOL_DEFAULT_SENDER``: the sender when none is given.
        ``MAILSPOOL_MANAGE_TRANSACTION`` (default ``True``): a transaction per request.
        ``MAILSPOOL_RELAY``, ``MAILSPOOL_CONFIG``: for ``flask mailspool run``.
    """

    def __init__(self, app: Flask | None = None, *, transaction_manager: Any = None) -> None:
        self.transaction_manager = transaction_manager or _transaction.manager
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read the app's config, create the spool if missing, hook into the requests.

        Raises:
            RuntimeError: ``MAILSPOOL_QUEUE_PATH`` is not set.
            SpoolError: the spool cannot be created.
        """
        path = app.config.get("MAILSPOOL_QUEUE_PATH")
        if not path:
            raise RuntimeError("MAILSPOOL_QUEUE_PATH is not set: name the spool directory")
        app.config.setdefault("MAILSPOOL_DEFAULT_SENDER", None)
        app.config.setdefault("MAILSPOOL_MANAGE_TRANSACTION", True)
        app.config.setdefault("MAILSPOOL_RELAY", {})
        app.config.setdefault("MAILSPOOL_CONFIG", None)
        delivery = QueuedMailDelivery(os.fspath(path), transaction_manager=self.transaction_manager)
        app.extensions["mailspool"] = _State(delivery, app.config["MAILSPOOL_DEFAULT_SENDER"])
        if app.config["MAILSPOOL_MANAGE_TRANSACTION"]:
            app.before_request(self._begin)
            app.after_request(self._end)
            app.teardown_request(self._teardown)
        app.cli.add_command(_cli)

    # -- the request's transaction ----------------------------------------------------

    def _begin(self) -> None:
        self.transaction_manager.begin()  # ends (aborts) a transaction left over
        setattr(g, _FLAG, True)

    def _end(self, response: Response) -> Response:
        if not g.pop(_FLAG, False):
            return response
        if response.status_code >= 400:
            self.transaction_manager.abort()
            return response
        try:
            self.transaction_manager.commit()
        except BaseException:
            self.transaction_manager.abort()
            raise  # Flask answers 500; nothing was queued
        return response

    def _teardown(self, exc: BaseException | None) -> None:
        # The response was never finished (an exception propagated): abort.
        if g.pop(_FLAG, False):
            self.transaction_manager.abort()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction for sending outside a request: commits at the end of the block.

        An exception in the block aborts it (nothing queued) and propagates.

        Raises:
            RuntimeError: called while a request's transaction is open
                (beginning another would abort the request's).
        """
        if has_request_context() and g.get(_FLAG, False):
            raise RuntimeError(
                "mail.transaction() inside a request: the request's transaction "
                "is already open, and mail sent in it goes when the request succeeds"
            )
        with self.transaction_manager:
            yield

    # -- sending -------------------------------------------------------------------------

    def send(
        self,
        fromaddr: str | None,
        toaddrs: Iterable[str] | str,
        message: bytes | str | Message,
        *,
        priority: str | None = None,
    ) -> str:
        """Queue ``message`` when the current transaction commits (see the module's docstring).

        Args:
            fromaddr: the envelope sender; ``None`` for ``MAILSPOOL_DEFAULT_SENDER``.
            toaddrs: the recipients (a ``str`` is one address).
            message: ``bytes``, ``str`` or an ``email.message.Message``.
            priority: ``"urgent"``, ``"normal"`` (the default) or ``"bulk"``.

        Returns:
            The Message-Id, without angle brackets.

        Raises:
            InvalidAddress, InvalidMessage: bad input, or no sender at all.
            ValueError: ``priority`` names no class.
        """
        state = self._state()
        sender = fromaddr or state.default_sender
        if not sender:
            raise InvalidAddress(fromaddr, "no sender: pass one or set MAILSPOOL_DEFAULT_SENDER")
        return state.delivery.send(sender, toaddrs, message, priority=priority)

    def send_mail(
        self,
        subject: str,
        body: str,
        to: Iterable[str] | str,
        *,
        sender: str | None = None,
        cc: Iterable[str] | str = (),
        bcc: Iterable[str] | str = (),
        reply_to: str | None = None,
        html: str | None = None,
        headers: Mapping[str, str] | None = None,
        priority: str | None = None,
    ) -> str:
        """Build a text (and HTML) message and :meth:`send` it; Bcc stays out of the header.

        ``priority``: as for :meth:`send`.

        Returns:
            The Message-Id, without angle brackets.

        Raises:
            InvalidAddress, InvalidMessage, ValueError: bad input (a line
                break in a header value is a ``ValueError``).
        """
        sender = sender or self._state().default_sender
        if not sender:
            raise InvalidAddress(sender, "no sender: pass one or set MAILSPOOL_DEFAULT_SENDER")
        to, cc, bcc = _listed(to), _listed(cc), _listed(bcc)
        # Checked before the email package parses them for the header
        # fields (it can fail on a bad address with an IndexError).
        envelope = make_envelope(sender, [*to, *cc, *bcc])
        if reply_to:
            parse_mailbox(reply_to)
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = sender
        if to:
            msg["To"] = ", ".join(to)
        if cc:
            msg["Cc"] = ", ".join(cc)
        if reply_to:
            msg["Reply-To"] = reply_to
        for name, value in (headers or {}).items():
            msg[name] = value
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
        return self._state().delivery.send(sender, envelope.recipients, msg, priority=priority)

    def _state(self) -> _State:
        try:
            state: _State = current_app.extensions["mailspool"]
        except KeyError:
            raise RuntimeError("Mailspool.init_app() was not called for this app") from None
        return state


def _listed(addresses: Iterable[str] | str) -> list[str]:
    return [addresses] if isinstance(addresses, str) else list(addresses)


_cli = AppGroup("mailspool", help="mailspool's queue processor, with this app's settings.")


@_cli.command("run")
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@click.option("-v", "--verbose", count=True, help="Log what is sent (-vv: debug).")
def _run(once: bool, verbose: int) -> None:
    """Deliver the queued mail: until SIGTERM/SIGINT, or one pass with --once.

    With --once the exit code is 1 when something failed or stayed deferred.
    """
    from mailspool.cli.common import summary_code, summary_line

    if verbose and not logging.getLogger().handlers:
        level = logging.DEBUG if verbose > 1 else logging.INFO
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    config = current_app.config
    try:
        loaded = load_processor_settings(
            config["MAILSPOOL_QUEUE_PATH"],
            config.get("MAILSPOOL_RELAY") or {},
            config_file=config.get("MAILSPOOL_CONFIG"),
        )
        summary = run_processor(loaded, once=once)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if summary is not None:
        click.echo(summary_line(summary))
        raise SystemExit(summary_code(summary))
