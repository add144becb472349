"""Relays that behave as real ones do: rate limits, one-off faults, outages.

Handlers for the ``smtp_relay`` factory of ``conftest.py`` (real aiosmtpd
relays on 127.0.0.1), each scripted for one case of the processor's
classification (docs/operations.md): a token bucket answering "too fast"
at MAIL FROM, a fault at one phase for every fifth transaction, a relay
that breaks every transaction, a relay that goes away with a message in
flight and comes back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from _relays import accept_mail
from conftest import Relay


def _close_soon(server: Any) -> None:
    """Close the session once the reply being returned is written."""
    asyncio.get_running_loop().call_soon(server.transport.close)


class TokenBucket:
    """Takes ``rate`` transactions a second (bursts of ``burst``); refuses
    the excess at MAIL FROM, as providers do.

    ``close``: answer ``421 4.7.0 ... try again later`` and close (Gmail's
    way); otherwise ``454 4.7.0 Throttling failure`` and stay (SES's way).
    ``refused`` counts the refusals.
    """

    def __init__(self, rate: float, burst: int, *, close: bool) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.close = close
        self.tokens = float(burst)
        self.refused = 0
        self._at = time.monotonic()

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return accept_mail(envelope, address, options)
        self.refused += 1
        if self.close:
            _close_soon(server)
            return "421 4.7.0 Try again later, closing connection"
        return "454 4.7.0 Throttling failure: Maximum sending rate exceeded"


class EveryFifth:
    """A one-off fault at one phase for every fifth transaction.

    ``kind``: ``"mail451"`` (451 at MAIL FROM), ``"rcpt421"`` (421 at
    RCPT, then the session is closed),
    ``"data451"`` (451 after the data), ``"drop_mid"`` (the connection cut
    while the data arrives), ``"drop_reply"`` (the message is taken, then
    the connection cut before the reply: the lost-reply window).  Set
    ``relay`` for ``"drop_mid"``.  ``faults`` counts the faults made.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.relay: Relay | None = None
        self.count = 0
        self.faults = 0

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.count += 1
        session.fault = self.count % 5 == 0
        if session.fault:
            self.faults += 1
            if self.kind == "drop_mid":
                assert self.relay is not None
                self.relay.drops_in_data += 1
            if self.kind == "mail451":
                return "451 4.3.0 temporary failure, try again"
        return accept_mail(envelope, address, options)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.kind == "rcpt421" and session.fault:
            _close_soon(server)
            return "421 4.3.0 local problem, closing"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if session.fault and self.kind == "data451":
            return "451 4.3.0 local error in processing"
        if session.fault and self.kind == "drop_reply":
            # Taken (the test relay records it), but the reply never arrives.
            server.transport.abort()
        return "250 2.0.0 OK"


class BreaksEveryTransaction:
    """Cuts the connection after each message's final dot, delivering nothing,
    while ``broken``; ``broke`` counts the transactions cut."""

    def __init__(self) -> None:
        self.broken = True
        self.broke = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.broken:
            return "250 2.0.0 OK"
        self.broke += 1
        server.transport.abort()
        return "451 4.3.0 (never read)"


class GoesAway:
    """Takes ``before`` messages, then goes away: the session carrying the next
    one is cut before its reply (nothing delivered) and new sessions get 421
    at EHLO, until ``back`` is set."""

    def __init__(self, before: int) -> None:
        self.before = before
        self.back = threading.Event()
        self.taken = 0

    def _down(self) -> bool:
        return self.taken >= self.before and not self.back.is_set()

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return ["421 4.3.2 service shutting down"] if self._down() else responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self._down():
            server.transport.abort()
            return "421 4.3.2 (never read)"
        self.taken += 1
        return "250 2.0.0 OK"


class FaultsOne:
    """Faults the transactions of the message whose body holds ``marker``, in
    turn, as ``kinds`` says (``"data451"``, or ``"drop_reply"``: taken, then
    the reply lost), and takes the rest; ``tries`` counts its transactions."""

    def __init__(self, marker: bytes, kinds: tuple[str, ...]) -> None:
        self.marker = marker
        self.kinds = kinds
        self.tries = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.marker not in (envelope.original_content or envelope.content or b""):
            return "250 2.0.0 OK"
        self.tries += 1
        kind = self.kinds[self.tries - 1] if self.tries <= len(self.kinds) else "ok"
        if kind == "data451":
            return "451 4.3.0 local error in processing"
        if kind == "drop_reply":
            server.transport.abort()  # taken (the test relay records it), no reply
        return "250 2.0.0 OK"


class RefusesSomeSessions:
    """Answers EHLO with 421 on every ``nth`` connection (a passing refusal)."""

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.connections = 0
        self.refused = 0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.connections += 1
        if self.connections % self.nth == 0:
            self.refused += 1
            return ["421 4.3.2 service not available, closing"]
        return responses
