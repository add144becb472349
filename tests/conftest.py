"""Shared fixtures: real SMTP relays (aiosmtpd) on 127.0.0.1.

``smtp_relay`` is a factory; each call starts a relay in its own thread on a
free port and returns a :class:`Relay`::

    def test_something(smtp_relay):
        relay = smtp_relay(tls="starttls", auth=True)
        mailer = SMTPMailer(**relay.mailer_kwargs())
        mailer.send("a@example.org", ["b@example.org"], b"Subject: x\\r\\n\\r\\nhi\\r\\n")
        assert relay.messages[0].rcpt_tos == ["b@example.org"]
        assert relay.connections == 1

Options of the factory (all keyword-only but ``handler``):

* ``handler``: any object with aiosmtpd ``handle_*`` coroutines (for
  instance ``handle_RCPT`` answering per address, ``handle_DATA`` answering
  a 4xx/5xx, sleeping, or calling ``server.transport.abort()``).  Messages
  the relay answers 250 to are recorded whatever the handler.
* ``tls``: ``None`` (plain), ``"starttls"`` or ``"implicit"``; the
  certificate comes from a trustme CA (``relay.ca``, ``relay.ca_file``) and
  names ``cert_names`` (default 127.0.0.1 and localhost).
* ``auth``: offer AUTH PLAIN/LOGIN, accepting ``relay.username`` /
  ``relay.password``; ``auth_require_tls`` (default True) as in aiosmtpd.
* ``smtputf8``: offer SMTPUTF8; ``size``: the SIZE limit (``None``: none).
* ``pipelining``: offer PIPELINING (default True, as Postfix, Exim and
  Sendmail do; aiosmtpd reads pipelined commands in order either way).
  ``relay.pipelined`` lists the commands that arrived with more input
  already waiting behind them, i.e. sent without waiting for their reply.
* ``ehlo_strip``: EHLO keywords to leave out (``"STARTTLS"``, ``"AUTH"``,
  ``"8BITMIME"``...), as a man in the middle or an old relay would.
* ``greeting``: the greeting line to send instead of 220 (e.g. a 554).
* ``replies``: command -> fixed reply, e.g. ``{"STARTTLS": "454 4.7.0 no TLS"}``;
  the command is then answered with it and not carried out.
* ``idle_timeout``: seconds after which the relay closes an idle connection.
* ``drop_in_data``: how many transactions to cut while their data arrives
  (354, a few KB read, then a reset); ``relay.drops_in_data`` can be set later.
* anything else goes to ``aiosmtpd.smtp.SMTP``.

The ``relay`` fixture is a plain relay with the defaults.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from mailspool.smtp.mailer import SMTPMailer

RELAY_USER = "mailer"
RELAY_PASSWORD = "s3cret-Pa55word"


@dataclass
class Received:
    """One message the relay accepted (answered 250 after DATA)."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    original_content: bytes
    mail_options: list[str]
    smtp_utf8: bool


@dataclass
class Relay:
    """A running test relay and what it saw."""

    host: str
    port: int
    tls: str | None
    ca: trustme.CA | None = None
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    #: messages accepted, in order
    messages: list[Received] = field(default_factory=list)
    #: TCP connections accepted (the controller's own start-up probe excluded)
    connections: int = 0
    #: every command verb received, in order ("EHLO", "STARTTLS", "AUTH", "MAIL"...)
    commands: list[str] = field(default_factory=list)
    #: the commands that arrived with more input already waiting behind them
    pipelined: list[str] = field(default_factory=list)
    #: (mechanism, login) of every AUTH attempt that reached the authenticator
    auth_attempts: list[tuple[str, str]] = field(default_factory=list)
    #: how many of the next transactions are cut in the middle of their data
    drops_in_data: int = 0
    controller: Controller | None = None

    def mailer_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``SMTPMailer`` that reach this relay, with short timeouts."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "tls": self.tls or "none",
            "connect_timeout": 5.0,
            "timeout": 5.0,
            "data_timeout": 5.0,
            "local_hostname": "client.test",
        }
        if self.ca_file is not None:
            kwargs["ca_file"] = self.ca_file
        if self.username is not None:
            kwargs["username"] = self.username
            kwargs["password"] = self.password
            if self.tls is None:
                kwargs["allow_plaintext_auth"] = True
        kwargs.update(overrides)
        return kwargs

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


class _Handler:
    """Wraps the test's handler: records accepted messages, edits EHLO.

    aiosmtpd finds hooks with ``dir(handler)``, so the wrapped handler's
    hooks are listed here too and reached through ``__getattr__``.
    """

    def __init__(self, relay: Relay, inner: Any, strip: Sequence[str], pipelining: bool) -> None:
        self._relay = relay
        self._inner = inner
        self._strip = {k.upper() for k in strip}
        self._pipelining = pipelining

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self._inner)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        hook = getattr(self._inner, "handle_EHLO", None)
        if hook is not None:
            responses = await hook(server, session, envelope, hostname, responses)
        if self._pipelining and responses[0].startswith("250"):
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        return [r for r in responses if r[4:].split(" ")[0].upper() not in self._strip]

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        hook = getattr(self._inner, "handle_DATA", None)
        status = "250 2.0.0 OK" if hook is None else await hook(server, session, envelope)
        if status is MISSING:
            status = "250 OK"
        if str(status).startswith("250"):
            self._relay.messages.append(
                Received(
                    mail_from=envelope.mail_from,
                    rcpt_tos=list(envelope.rcpt_tos),
                    content=bytes(envelope.content),
                    original_content=bytes(envelope.original_content),
                    mail_options=list(envelope.mail_options),
                    smtp_utf8=bool(envelope.smtp_utf8),
                )
            )
        return str(status)


class _RelaySMTP(SMTP):
    """aiosmtpd's SMTP: records every command, can answer some with a fixed
    reply, and can change its greeting."""

    def __init__(
        self,
        relay: Relay,
        greeting: str | None,
        replies: Mapping[str, str],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._relay = relay
        self._greeting = greeting
        self._greeted = False
        for name, method in list(self._smtp_methods.items()):
            self._smtp_methods[name] = self._recording(name, method, replies.get(name))

    def _recording(
        self, name: str, method: Callable[[Any], Any], reply: str | None
    ) -> Callable[[Any], Any]:
        async def record(arg: Any) -> None:
            self._relay.commands.append(name)
            if self._reader is not None and len(self._reader._buffer):  # type: ignore[attr-defined]
                self._relay.pipelined.append(name)
            if reply is None:
                await method(arg)
            else:
                await self.push(reply)

        return record

    async def smtp_DATA(self, arg: str) -> None:
        if self._relay.drops_in_data > 0 and self.envelope is not None and self.envelope.rcpt_tos:
            # Cut the connection while the data is arriving: answer 354, read
            # a little, close with unread data (the kernel sends a reset).
            self._relay.drops_in_data -= 1
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._reader.read(4096)
            assert self.transport is not None
            self.transport.abort()
            return
        await super().smtp_DATA(arg)

    async def push(self, status: Any) -> None:
        if not self._greeted:
            self._greeted = True
            if self._greeting is not None:
                status = self._greeting
        await super().push(status)


class _Controller(Controller):
    def __init__(
        self,
        relay: Relay,
        greeting: str | None,
        replies: Mapping[str, str],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._relay = relay
        self._greeting = greeting
        self._replies = replies
        super().__init__(*args, **kwargs)

    def factory(self) -> SMTP:
        self._relay.connections += 1
        return _RelaySMTP(
            self._relay, self._greeting, self._replies, self.handler, **self.SMTP_kwargs
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def smtp_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, str]:
    """A trustme CA (not trusted by the system) and the path of its PEM file."""
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, str(path)


RelayFactory = Callable[..., Relay]


def _tls_kwargs(tls: str, ca: trustme.CA, cert_names: Sequence[str]) -> dict[str, Any]:
    """The controller's TLS argument: a context with a certificate for ``cert_names``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*cert_names).configure_cert(context)
    return {"tls_context" if tls == "starttls" else "ssl_context": context}


def _authenticator(relay: Relay) -> Callable[..., AuthResult]:
    """Accepts RELAY_USER and RELAY_PASSWORD; records each attempt on ``relay``."""

    def authenticator(
        server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = data.login.decode("utf-8", "replace")
        relay.auth_attempts.append((mechanism, login))
        ok = login == RELAY_USER and data.password == RELAY_PASSWORD.encode()
        return AuthResult(success=ok, handled=False)

    return authenticator


@pytest.fixture
def smtp_relay(smtp_ca: tuple[trustme.CA, str]) -> Iterator[RelayFactory]:
    """A factory of running relays (see the module docstring); all stopped afterwards."""
    started: list[Relay] = []

    def make(
        handler: Any = None,
        *,
        tls: str | None = None,
        auth: bool = False,
        auth_require_tls: bool = True,
        smtputf8: bool = True,
        size: int | None = 2**25,
        pipelining: bool = True,
        ehlo_strip: Sequence[str] = (),
        greeting: str | None = None,
        replies: Mapping[str, str] | None = None,
        idle_timeout: float | None = None,
        drop_in_data: int = 0,
        cert_names: Sequence[str] = ("127.0.0.1", "localhost"),
        **smtp_kwargs: Any,
    ) -> Relay:
        if tls not in (None, "starttls", "implicit"):
            raise ValueError(f"tls must be None, 'starttls' or 'implicit', not {tls!r}")
        ca, ca_file = smtp_ca
        relay = Relay(host="127.0.0.1", port=0, tls=tls, drops_in_data=drop_in_data)
        kwargs: dict[str, Any] = {
            "enable_SMTPUTF8": smtputf8,
            "data_size_limit": size,
            # aiosmtpd only counts STARTTLS as TLS; implicit TLS is TLS too.
            "auth_require_tls": auth_require_tls and tls != "implicit",
            **smtp_kwargs,
        }
        if idle_timeout is not None:
            kwargs["timeout"] = idle_timeout
        if tls is not None:
            relay.ca, relay.ca_file = ca, ca_file
            kwargs.update(_tls_kwargs(tls, ca, cert_names))
        if auth:
            relay.username, relay.password = RELAY_USER, RELAY_PASSWORD
            kwargs["authenticator"] = _authenticator(relay)
        wrapped = _Handler(relay, handler, ehlo_strip, pipelining)
        for attempt in range(5):
            port = _free_port()
            controller = _Controller(
                relay,
                greeting,
                {k.upper(): v for k, v in (replies or {}).items()},
                wrapped,
                hostname="127.0.0.1",
                port=port,
                server_hostname="relay.test",
                **kwargs,
            )
            try:
                controller.start()
            except OSError as exc:  # the port was taken in between: try another
                if exc.errno != errno.EADDRINUSE or attempt == 4:
                    raise
                continue
            break
        relay.port = port
        relay.controller = controller
        # The controller's start-up probe is not a client's connection.
        relay.connections = 0
        relay.commands.clear()
        relay.pipelined.clear()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(smtp_relay: RelayFactory) -> Relay:
    """A plain relay (no TLS, no AUTH) that accepts everything."""
    return smtp_relay()


@pytest.fixture
def ca_file(smtp_ca: tuple[trustme.CA, str]) -> str:
    """The PEM file of the CA that signs the test relays' certificates."""
    return smtp_ca[1]


@pytest.fixture
def mailer_for() -> Iterator[Callable[..., SMTPMailer]]:
    """Make an SMTPMailer for a relay; its connection is closed afterwards."""
    made: list[SMTPMailer] = []

    def make(relay: Any, **overrides: Any) -> SMTPMailer:
        mailer = SMTPMailer(**relay.mailer_kwargs(**overrides))
        made.append(mailer)
        return mailer

    yield make
    for mailer in made:
        mailer.close()


def pytest_configure(config: pytest.Config) -> None:
    # The test relays log every command at INFO on aiosmtpd's "mail.log".
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # A relay with implicit TLS and auth_required looks like "AUTH without TLS"
    # to aiosmtpd (it only counts STARTTLS), which warns about it.
    config.addinivalue_line(
        "filterwarnings", "ignore:Requiring AUTH while not requiring TLS:UserWarning"
    )
