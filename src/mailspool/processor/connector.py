"""Opening the relay's connections, and what the relay's trouble does to the processor.

Connections are opened one at a time, under a lock that re-checks the
pause, so a dead relay sees one attempt per backoff step, not one per
queued message.  What is whose trouble is decided by the phase and the
evidence (:func:`~mailspool.processor.outcome.trouble_kind`; the table is
in docs/operations.md):

* opening a session fails (connect, greeting, EHLO, STARTTLS, AUTH, or a
  refusal about our configuration): the relay is paused
  (:class:`~mailspool.processor.policy.RelayState`); but a 421 greeting
  while other sessions work only lowers the number of connections;
* the relay says "too fast" at ``MAIL``: the learned rate is cut
  (:class:`~mailspool.processor.pacing.Pacer`);
* the session breaks in a transaction: a new connection is opened at once.
  If that fails the relay is gone: paused.  If :data:`~mailspool.processor.policy.COHORT`
  transactions broke in a row the relay is paused as a whole.

Relay pauses are told once per outage, a warning per failed probe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from mailspool.errors import DeliveryError
from mailspool.processor.outcome import human, one_line, per_second
from mailspool.processor.pacing import Pacer
from mailspool.processor.policy import COHORT, THROTTLE_PERIOD, RelayState
from mailspool.processor.pool import Connection, ConnectionPool, connect, relay_name
from mailspool.smtp.seams import Mailer

__all__ = ["Connector", "NotNow", "RelayTrouble"]

# The processor's logger: operators configure one name for all of its parts.
log = logging.getLogger("mailspool.processor")


class RelayTrouble(Exception):
    """Opening a connection failed; the relay is paused already (or, with
    ``again``, only fewer connections are allowed: try the message again)."""

    def __init__(self, error: BaseException, *, again: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.again = again


class NotNow(Exception):
    """The relay was paused, or a stop requested, before this message was sent."""


class Connector:
    """Opens connections to the relay, one at a time, and records its trouble.

    Args:
        mailer: what :func:`~mailspool.processor.pool.connect` opens.
        relay: the relay's pause and parallelism, shared with the dispatcher.
        pool: the connections to the relay.
        pacer: the sending rate (cut when the relay says "too fast").
        stopping: true once the processor is asked to stop.
    """

    def __init__(
        self,
        mailer: Mailer,
        *,
        relay: RelayState,
        pool: ConnectionPool,
        pacer: Pacer,
        stopping: Callable[[], bool],
    ) -> None:
        self.mailer = mailer
        self.relay = relay
        self.pool = pool
        self.pacer = pacer
        self.where = relay_name(mailer)
        self._stopping = stopping
        self._lock = threading.Lock()
        #: the failure that paused the relay last, on one line (for ``status``)
        self.trouble = ""

    def open(self, now: float) -> Connection:
        """Open a connection (one at a time: a dead relay sees one probe).

        Raises:
            NotNow: stopping, or the relay is paused.
            RelayTrouble: it could not be opened (the relay is paused now,
                or, with ``again``, fewer connections are allowed).
        """
        with self._lock:
            if self._stopping() or self.relay.paused(now):
                raise NotNow()
            try:
                conn = connect(self.mailer)
            except Exception as exc:  # whatever it is, it is not the message's fault
                crowded = isinstance(exc, DeliveryError) and exc.code == 421
                others = self.pool.count_alive() if crowded else 0
                if others:  # "too many connections": fewer, but no pause
                    self._crowded(now, exc, others)
                    raise RelayTrouble(exc, again=True) from exc
                self.pause(now, exc)  # before the next sender may try
                raise RelayTrouble(exc) from exc
            self.pool.add(conn)
            return conn

    def replace(self, now: float) -> bool:
        """After a session broke in a transaction: replace it, and see whether
        the relay still takes connections (False: it is paused now)."""
        with self._lock:
            if self.relay.paused(now):
                return False
            try:
                conn = connect(self.mailer)
            except Exception as exc:  # whatever it is, the relay is the trouble
                self.pause(now, exc)
                return False
            self.pool.add(conn)
        self.pool.give_back(conn, keep=self.relay.parallelism(now))
        return True

    def cohort(self, now: float, exc: BaseException) -> bool:
        """Count a broken session; True when it completes a cohort (relay paused)."""
        pause = self.relay.broken(now)
        if pause is None:
            return False
        self.trouble = f"broke {COHORT} transactions in a row (last: {one_line(str(exc))})"
        log.error(
            "relay %s broke %d transactions in a row (last: %s); deliveries paused "
            "for %s, then one message probes it (no message is failed for this)",
            self.where,
            COHORT,
            one_line(str(exc)),
            human(pause.delay),
        )
        return True

    def too_fast(self, now: float, exc: BaseException, started: float | None) -> bool:
        """The relay refused for rate: slow down.  True when it gave up on
        pacing (the relay is paused now); ``started``: when the refused
        transaction began, on the pacer's clock."""
        cut = self.pacer.refused(self.pacer.clock() if started is None else started)
        if cut is not None and cut.give_up:
            self.pause(now, exc)
            return True
        if cut is not None:
            conns = self.relay.slow_down(now)
            log.warning(
                "relay %s says too fast (%s): pacing at %s, %d connection(s)%s",
                self.where,
                one_line(str(exc)),
                per_second(cut.rate),
                conns,
                f", next message in {cut.hold:.3g}s" if cut.hold else "",
            )
        return False

    def _crowded(self, now: float, exc: BaseException, others: int) -> None:
        limit = self.relay.crowd(now, others)
        log.warning(
            "relay %s refused a connection while %d were open (%s): at most %d "
            "connection(s) for %s; deliveries go on",
            self.where,
            others,
            one_line(str(exc)),
            limit,
            human(THROTTLE_PERIOD),
        )

    def pause(self, now: float, exc: BaseException) -> None:
        """Record relay-level trouble: one error per outage, a warning per failed probe."""
        pause = self.relay.trouble(now)
        if pause is None:
            return  # already paused for this step
        self.trouble = one_line(str(exc))
        if pause.failures == 1:
            log.error(
                "relay %s unavailable: %s; deliveries paused for %s, then one "
                "message probes it (no message is failed for this)",
                self.where,
                one_line(str(exc)),
                human(pause.delay),
            )
        else:
            log.warning(
                "relay %s still unavailable (probe %d): %s; next probe in %s",
                self.where,
                pause.failures,
                one_line(str(exc)),
                human(pause.delay),
            )
