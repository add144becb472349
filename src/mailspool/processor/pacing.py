"""The sending rate: at most the configured limit, and what the relay accepts.

:class:`Pacer` spaces messages evenly (no bursts) at a rate that is the
configured ``rate_limit`` when there is one, and is *learned* from the
relay's "too fast" replies when it says so: a refusal cuts the rate, each
message accepted raises it a little (AIMD, as TCP does), never above the
configured limit.  Pure bookkeeping like :mod:`mailspool.processor.policy`:
no I/O, no sleeping, the clock injected; the caller waits what
:meth:`Pacer.reserve` returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CUT", "FIRST_HOLD_MAX", "IDLE_RESET", "MAX_HOLD", "MIN_RATE", "STEP", "Cut", "Pacer"]

#: The lowest rate the pacer goes down to, in messages per second.
MIN_RATE = 1 / 60
#: A cut keeps this fraction of the rate the relay was seen to accept.
CUT = 0.8
#: Each accepted message raises the rate by this fraction of the rate set
#: at the last cut: back above what was refused after about 12 messages.
#: (With a token bucket the relay then gets 75-100 % of its rate, with 2-7 %
#: of the attempts refused; tests/test_processor_relays.py simulates it.)
STEP = 0.02
#: Longest wait imposed after refusals in a row with nothing accepted, s.
MAX_HOLD = 60.0
#: The longest first hold (see :class:`Pacer`), seconds.
FIRST_HOLD_MAX = 1.0
#: After this many idle seconds the pacer starts measuring afresh.
IDLE_RESET = 30.0


@dataclass(frozen=True)
class Cut:
    """What :meth:`Pacer.refused` did.

    Attributes:
        rate: messages per second from now on.
        hold: seconds before the next message may start (0: just the rate).
        give_up: refused again after the longest hold: pause the relay.
    """

    rate: float
    hold: float
    give_up: bool = False


class Pacer:
    """The sending rate the relay accepts, learned from its "too fast" replies.

    Starts at ``ceiling`` (the configured limit), or unpaced when there is
    none.  A refusal for rate of a transaction started after the last cut
    (those in flight then tell nothing new) cuts the rate to
    :data:`CUT` times what the relay accepted since the last cut (the
    messages accepted over the time since); each accepted message then
    raises it by :data:`STEP` of the cut rate, never above ``ceiling``.
    Refused again with nothing accepted in between (a relay that counts per
    minute, say), the rate stays and a hold is added before the next
    message, doubling up to :data:`MAX_HOLD`; refused after that, the
    caller pauses the relay.  The first hold after the first refusal is at
    least as long as the relay took messages before it (its burst, or its
    window's worth; at most :data:`FIRST_HOLD_MAX`): a relay that took ten
    in 20 ms and then refused will not take the next one in 3 ms, and each
    shorter hold would only be one more refusal.  All times come from ``clock`` (monotonic).

    Args:
        ceiling: messages per second at most, or None for no limit.
        clock: a monotonic clock in seconds.
    """

    def __init__(
        self, ceiling: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ceiling is not None and not ceiling > 0:
            raise ValueError(f"rate must be greater than 0, got {ceiling!r}")
        self.ceiling = ceiling
        self.clock = clock
        self._lock = threading.Lock()
        self._rate = ceiling
        self._step = 0.0
        self._next: float | None = None  # the next free slot
        self._cut_at: float | None = None  # when the last cut (or epoch) began
        self._accepted = 0  # messages accepted since then
        self._hold = 0.0
        self._mark: float | None = None  # the last refusal counted
        self._last = -IDLE_RESET  # the last reserve()
        self._burst = 0.0  # how long the relay took messages before it first refused

    @property
    def rate(self) -> float | None:
        """Messages per second now (None: not paced)."""
        return self._rate

    @property
    def learned(self) -> bool:
        """True when the rate was cut at least once (it is the relay's, not ours)."""
        return self._step > 0

    def reserve(self) -> float:
        """Take the next slot; return the seconds to wait for it (0: go now)."""
        with self._lock:
            now = self.clock()
            if now - self._last >= IDLE_RESET:
                self._cut_at, self._accepted = now, 0  # idle: measure afresh
            if self._rate is None:
                self._last = now
                return 0.0
            slot = now if self._next is None else max(now, self._next)
            self._next = slot + 1.0 / self._rate
            self._last = slot  # a wait for the slot is not idleness
            return slot - now

    def accepted(self) -> None:
        """A message was accepted: raise the rate by one step."""
        with self._lock:
            self._accepted += 1
            self._hold = 0.0
            if self._rate is None or not self._step:
                return
            rate = self._rate + self._step
            self._rate = rate if self.ceiling is None else min(rate, self.ceiling)

    def refused(self, started: float) -> Cut | None:
        """A "too fast" reply to a transaction begun at ``started`` (this clock).

        Returns:
            What changed, or None when the transaction began before the last
            refusal was counted (it was already answered for).
        """
        with self._lock:
            now = self.clock()
            if self._mark is not None and started < self._mark:
                return None
            self._mark = now
            cut_at = self._cut_at if self._cut_at is not None else started
            if self._accepted or self._rate is None:
                if not self._step:
                    self._burst = min(now - cut_at, FIRST_HOLD_MAX)
                # What the relay took since the last cut, holds included.
                seen = self._accepted / max(now - cut_at, 1e-3)
                if not self._accepted:
                    seen = 1.0 / CUT  # refused at once: nothing measured, start at 1/s
                current = seen if self._rate is None else min(self._rate, seen)
                self._rate = max(MIN_RATE, CUT * current)
                self._step = STEP * self._rate
                self._hold = 0.0
                self._cut_at, self._accepted = now, 0
            elif self._hold >= MAX_HOLD:
                self._hold = 0.0
                return Cut(self._rate, MAX_HOLD, give_up=True)
            else:
                floor = max(1.0 / self._rate, self._burst)
                self._burst = 0.0  # the first hold only
                self._hold = min(MAX_HOLD, max(floor, 2 * self._hold))
            self._next = now + max(self._hold, 1.0 / self._rate)
            return Cut(self._rate, self._hold)
