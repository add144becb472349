"""When to try again: the retry schedule, the relay's pause, the rate limit.

Everything here is pure bookkeeping: no I/O, no sleeping, and every time
is a value the caller passes in or reads from an injected clock.  The
queue processor asks these objects what to do; tests ask them the same
questions with made-up times and get the answers without waiting.

* :class:`RetryPolicy` says when a message is tried again after a
  temporary failure, and when the processor gives up on it.
* :class:`RelayState` is the processor's view of the relay: whether it is
  paused after relay-level trouble (cannot connect, 421, TLS, AUTH), how
  many probes have failed, and how many messages may be in flight (one
  while probing; half as many for a while after "too many connections").
* :class:`RateLimiter` spaces messages evenly to honour a provider's
  limit.

The two objects with state are shared by the sender threads, hence their
locks; they never block for longer than a few assignments.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["THROTTLE_PERIOD", "Pause", "RateLimiter", "RelayState", "RetryPolicy", "backoff"]

#: Seconds the parallelism stays lowered after a 421 "too many connections".
THROTTLE_PERIOD = 600.0


def backoff(first: float, factor: float, cap: float, n: int) -> float:
    """The ``n``-th delay of an exponential schedule (``n`` counts from 1).

    Args:
        first: the first delay.
        factor: each further step multiplies the delay by this.
        cap: the longest delay.
        n: which step; anything below 1 counts as 1.

    Returns:
        ``min(cap, first * factor ** (n - 1))``, without overflowing.
    """
    try:
        delay = first * factor ** (max(1, n) - 1)
    except OverflowError:
        return cap
    return min(cap, delay)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a message again, and when to give up on it.

    All times are seconds; any positive value works, so tests can use
    seconds where production uses hours.  The defaults follow Postfix and
    RFC 5321 4.5.4.1: about 5 minutes, doubling up to an hour, 5 days.

    Attributes:
        first_delay: wait after the first failed attempt.
        factor: each further failed attempt multiplies the wait by this.
        max_delay: the longest wait between attempts.
        give_up_after: a message still undelivered this long after it was
            queued fails ("expired") at its next temporary failure; the last
            retry is moved forward to that time.
        relay_first_delay: how long the relay is paused after its first
            relay-level failure (cannot connect, 421, TLS, AUTH).
        relay_max_delay: the longest relay pause.

    Raises:
        ValueError: a delay is not positive, ``factor`` is below 1, or a
            maximum is shorter than its first delay.
    """

    first_delay: float = 300.0
    factor: float = 2.0
    max_delay: float = 3600.0
    give_up_after: float = 5 * 86400.0
    relay_first_delay: float = 30.0
    relay_max_delay: float = 600.0

    def __post_init__(self) -> None:
        for name in ("first_delay", "give_up_after", "relay_first_delay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)!r}")
        if not self.factor >= 1:
            raise ValueError(f"factor must be at least 1, got {self.factor!r}")
        if not self.max_delay >= self.first_delay:
            raise ValueError("max_delay must not be shorter than first_delay")
        if not self.relay_max_delay >= self.relay_first_delay:
            raise ValueError("relay_max_delay must not be shorter than relay_first_delay")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1 for the first)."""
        return backoff(self.first_delay, self.factor, self.max_delay, attempts)

    def relay_delay(self, failures: int) -> float:
        """Seconds to pause the relay after its ``failures``-th failure in a row."""
        return backoff(self.relay_first_delay, self.factor, self.relay_max_delay, failures)

    def retry_at(self, now: float, attempts: int, queued_at: float) -> float | None:
        """When to try again after the ``attempts``-th failed attempt at ``now``.

        Args:
            now: the time of the failed attempt.
            attempts: failed attempts so far, this one included.
            queued_at: when the message was queued.

        Returns:
            The time of the next attempt, never later than the give-up time;
            None when the give-up time has come (the message expires now).
        """
        expires = queued_at + self.give_up_after
        if now >= expires:
            return None
        return min(now + self.delay(attempts), expires)


@dataclass(frozen=True)
class Pause:
    """A relay pause that has just begun (what :meth:`RelayState.trouble` returns).

    Attributes:
        delay: seconds until the next probe.
        failures: relay-level failures in a row, this one included (1: the
            outage begins; more: a probe failed).
        lowered: the parallelism was lowered (a 421 while other connections
            were open).
    """

    delay: float
    failures: int
    lowered: bool


class RelayState:
    """Pause, probe and throttle state of one relay, shared by the sender threads.

    ``now`` is always a value of the processor's clock.  The rules:

    * relay-level trouble pauses the relay (:meth:`trouble`); a second
      report for the same step is ignored, so an outage gives one pause,
      not one per message in flight;
    * while ``failures`` is not zero, one message at a time is let through
      (the probe); each failed probe doubles the pause;
    * a message the relay worked on (:meth:`answered`) ends the outage, but
      only after the pause: one under way when it began proves nothing;
    * a 421 while other connections were open lowers the parallelism for
      :data:`THROTTLE_PERIOD`: to the number of those others (what the
      relay did accept) when known, else to half.

    Args:
        policy: gives the length of each pause.
        connections: the parallelism when nothing is wrong.
    """

    def __init__(self, policy: RetryPolicy, connections: int) -> None:
        self._policy = policy
        self._max = connections
        self._lock = threading.Lock()
        self._limit = connections
        self._throttled_until = 0.0
        self._failures = 0
        self._paused_until = 0.0

    @property
    def paused_until(self) -> float:
        """The end of the current (or last) pause."""
        return self._paused_until

    @property
    def failures(self) -> int:
        """Relay-level failures in a row (0: the relay works)."""
        return self._failures

    def paused(self, now: float) -> bool:
        """True while nothing may be attempted."""
        return now < self._paused_until

    def parallelism(self, now: float) -> int:
        """How many messages may be in flight at ``now``."""
        with self._lock:
            if self._failures:
                return 1  # probing: one message at a time until one gets through
            if self._limit < self._max and now >= self._throttled_until:
                self._limit = self._max
            return self._limit

    def grow(self, connections: int) -> None:
        """Allow ``connections`` in flight from now on (more were opened)."""
        with self._lock:
            if connections > self._max:
                if self._limit == self._max:
                    self._limit = connections
                self._max = connections

    def trouble(
        self, now: float, *, crowded: bool = False, others: int | None = None
    ) -> Pause | None:
        """Record a relay-level failure.

        Args:
            now: when it happened.
            crowded: a 421 while other connections were open ("too many
                connections"): also lower the parallelism for a while.
            others: how many other connections were open then; the
                parallelism is lowered to that (at least 1, and always
                below what it was).  ``None``: halve it.

        Returns:
            The :class:`Pause` it begins, or None when the relay was already
            paused for this step (another message reported it first).
        """
        with self._lock:
            if now < self._paused_until:
                return None
            if crowded:
                lowered = self._limit // 2 if others is None else min(others, self._limit - 1)
                self._limit = max(1, lowered)
                self._throttled_until = now + THROTTLE_PERIOD
            self._failures += 1
            delay = self._policy.relay_delay(self._failures)
            self._paused_until = now + delay
            return Pause(delay, self._failures, crowded)

    def answered(self, now: float) -> int:
        """The relay worked on a message; return how many probes had failed before.

        A message that was under way when the pause began proves nothing: the
        pause stands until its end, then a probe decides.
        """
        with self._lock:
            if now < self._paused_until:
                return 0
            failures, self._failures = self._failures, 0
            return failures


class RateLimiter:
    """At most ``rate`` messages per second, spaced evenly (no bursts).

    A slot is reserved before each message; the caller waits the returned
    time (cut short when it is asked to stop; the slot is then simply lost).

    Args:
        rate: messages per second (``n / 60`` for ``n`` per minute).
        clock: a monotonic clock in seconds.

    Raises:
        ValueError: ``rate`` is not positive.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be greater than 0, got {rate!r}")
        self._interval = 1.0 / rate
        self._clock = clock
        self._next: float | None = None
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take the next free slot; return the seconds to wait for it (0: go now)."""
        with self._lock:
            now = self._clock()
            slot = now if self._next is None else max(now, self._next)
            self._next = slot + self._interval
            return slot - now
