"""When to try again: the retry schedule, the relay's pause and parallelism.

Everything here is pure bookkeeping: no I/O, no sleeping, and every time
is a value the caller passes in or reads from an injected clock.  The
queue processor asks these objects what to do; tests ask them the same
questions with made-up times and get the answers without waiting.

* :class:`RetryPolicy` says when a message is tried again after a
  temporary failure, and when the processor gives up on it.
* :class:`RelayState` is the processor's view of the relay: whether it is
  paused after relay-level trouble (cannot connect, a bad greeting, TLS,
  AUTH, or a cohort of broken transactions), how many probes have failed,
  and how many messages may be in flight (one while probing; fewer for a
  while after "too many connections" or "too fast", growing back one at
  a time as messages are accepted).

The sending rate (the configured limit, and what the relay accepts) is
:mod:`mailspool.processor.pacing`'s.

The two objects with state are shared by the sender threads, hence their
locks; they never block for longer than a few assignments.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = [
    "COHORT",
    "QUICK_IN_PASS",
    "QUICK_TRIES",
    "THROTTLE_PERIOD",
    "Pause",
    "RelayState",
    "RetryPolicy",
    "backoff",
]

#: Seconds the parallelism stays lowered after a 421 "too many connections".
THROTTLE_PERIOD = 600.0
#: The longest wait before a quick retry that a pass makes itself, seconds:
#: a pass lasts at most about this much longer for the messages it tries
#: again; a longer wait is left to a later pass.
QUICK_IN_PASS = 10.0
#: Attempts one pass makes at most at a message whose attempts all met
#: one-off faults (the first and four quick retries, within about 1.5 s
#: with the default ``quick_retry``): with faults that strike a fraction f
#: of the transactions at random (quick retries included), f**5 of the
#: messages wait for the usual schedule, not f.
QUICK_TRIES = 5
#: Transactions in a row whose session broke (no reply, or a 421) after
#: which the relay as a whole is paused, as Postfix does when a cohort of
#: sessions fails: one broken session is a message's bad luck, several in a
#: row are the relay's trouble.
COHORT = 3


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
        quick_retry: the wait after a first attempt that met a one-off
            fault: its session broke in the transaction (connection lost,
            no reply, a 421) while the relay itself still takes
            connections, or it got a 4xx to ``MAIL`` or to the data.  The
            attempt is counted and the message tried again this long after,
            in the same pass (when it is at most :data:`QUICK_IN_PASS`;
            otherwise by a later pass); a second one-off fault waits
            ``factor`` times as long, and after :data:`QUICK_TRIES`
            attempts the usual schedule follows, from ``first_delay``.  A
            4xx at ``RCPT`` (greylisting, most often) always gets the usual
            schedule.  Never longer than ``first_delay``.
        jitter: each retry time is moved later by up to this fraction of
            its delay, at random, so that messages deferred together are
            not all tried again in the same second.  0 to 1.

    Raises:
        ValueError: a delay is not positive, ``factor`` is below 1, a
            maximum is shorter than its first delay, ``quick_retry`` is
            negative or ``jitter`` not between 0 and 1.
    """

    first_delay: float = 300.0
    factor: float = 2.0
    max_delay: float = 3600.0
    give_up_after: float = 5 * 86400.0
    relay_first_delay: float = 30.0
    relay_max_delay: float = 600.0
    quick_retry: float = 0.1
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")
        for name in ("first_delay", "give_up_after", "relay_first_delay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)!r}")
        if not self.factor >= 1:
            raise ValueError(f"factor must be at least 1, got {self.factor!r}")
        if not self.max_delay >= self.first_delay:
            raise ValueError("max_delay must not be shorter than first_delay")
        if not self.relay_max_delay >= self.relay_first_delay:
            raise ValueError("relay_max_delay must not be shorter than relay_first_delay")
        if not self.quick_retry >= 0:
            raise ValueError(f"quick_retry must not be negative, got {self.quick_retry!r}")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1 for the first)."""
        return backoff(self.first_delay, self.factor, self.max_delay, attempts)

    def quick_delay(self, tries: int) -> float:
        """Seconds to wait after the ``tries``-th attempt of a pass that met a
        one-off fault: ``quick_retry``, then ``factor`` times as long, never
        longer than ``first_delay``."""
        return backoff(self.quick_retry, self.factor, self.first_delay, tries)

    def relay_delay(self, failures: int) -> float:
        """Seconds to pause the relay after its ``failures``-th failure in a row."""
        return backoff(self.relay_first_delay, self.factor, self.relay_max_delay, failures)

    def retry_at(
        self,
        now: float,
        attempts: int,
        queued_at: float,
        *,
        spread: float = 0.0,
        quick: bool = False,
    ) -> float | None:
        """When to try again after the ``attempts``-th failed attempt at ``now``.

        Args:
            now: the time of the failed attempt.
            attempts: failed attempts so far, this one included.
            queued_at: when the message was queued.
            spread: a number in [0, 1) (``random.random()``): the delay is
                lengthened by ``spread * jitter`` of itself.
            quick: a quick retry after a one-off fault (see ``quick_retry``):
                ``attempts`` counts the attempts of this pass, and the
                delay is :meth:`quick_delay`'s.

        Returns:
            The time of the next attempt, never later than the give-up time;
            None when the give-up time has come (the message expires now).
        """
        expires = queued_at + self.give_up_after
        if now >= expires:
            return None
        delay = self.quick_delay(attempts) if quick else self.delay(attempts)
        return min(now + delay * (1.0 + self.jitter * spread), expires)


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
        self._grown = 0  # messages accepted since the parallelism last grew
        self._crowded = False  # lowered by crowd(): stays so for THROTTLE_PERIOD
        self._broken = 0  # transactions in a row whose session broke

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
        if not self._failures and self._limit >= self._max:
            return self._limit  # the common case, twice per message: no lock
        with self._lock:
            if self._failures:
                return 1  # probing: one message at a time until one gets through
            if self._limit < self._max and now >= self._throttled_until:
                self._limit = self._max
                self._crowded = False
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

    def crowd(self, now: float, others: int) -> int:
        """A connection was refused (421) while ``others`` were open: lower, do not pause.

        The parallelism goes down to ``others`` (at least 1, always below
        what it was) for :data:`THROTTLE_PERIOD`.  Returns the new limit.
        """
        with self._lock:
            self._limit = max(1, min(others, self._limit))
            self._throttled_until = now + THROTTLE_PERIOD
            self._crowded = True  # no growth until the period ends
            self._grown = 0
            return self._limit

    def slow_down(self, now: float) -> int:
        """The relay said "too fast": halve the parallelism (at least 1); return it.

        It comes back one connection at a time as messages are accepted
        (:meth:`accepted`), or all at once after :data:`THROTTLE_PERIOD`.
        """
        with self._lock:
            self._limit = max(1, self._limit // 2)
            self._throttled_until = now + THROTTLE_PERIOD
            self._grown = 0
            return self._limit

    def accepted(self) -> None:
        """A message was accepted: one more connection after ``8 * limit`` of them."""
        with self._lock:
            self._broken = 0
            if self._limit >= self._max or self._crowded:
                return
            self._grown += 1
            if self._grown >= 8 * self._limit:
                self._grown = 0
                self._limit += 1

    def broken(self, now: float) -> Pause | None:
        """A transaction's session broke (lost, no reply, a 421) while the relay
        still takes connections; after :data:`COHORT` in a row the relay is
        paused as a whole: the :class:`Pause` is returned then."""
        with self._lock:
            self._broken += 1
            if self._broken < COHORT:
                return None
            self._broken = 0
        return self.trouble(now)

    def worked(self) -> None:
        """A transaction ended with a reply (accepted or refused): the sessions work."""
        self._broken = 0

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
