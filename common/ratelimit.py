"""Rate limiting of keyframe requests, shared by the SFU engine and the relay.

Sans-I/O: time is passed in.
"""

from __future__ import annotations


class KeyframeLimiter:
    """At most one keyframe request per ``interval``.

    A request inside the window is not lost: it is remembered and becomes due when the
    window ends (leading + trailing edge), so the last request is always honoured.
    """

    __slots__ = ("_last", "dropped", "interval", "pending")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = float("-inf")
        self.pending = False
        self.dropped = 0

    def request(self, now: float) -> bool:
        """Register a request; True if it must be sent now."""
        if now - self._last >= self.interval:
            self._last = now
            self.pending = False
            return True
        if self.pending:
            self.dropped += 1
        self.pending = True
        return False

    def allow(self, now: float) -> bool:
        """Leading-edge only variant (used by the origin to police peers)."""
        if now - self._last >= self.interval:
            self._last = now
            return True
        self.dropped += 1
        return False

    @property
    def last_sent(self) -> float:
        """When the last request went out (-inf if none has)."""
        return self._last

    def deadline(self) -> float | None:
        """When a pending request becomes due, or None."""
        return self._last + self.interval if self.pending else None

    def poll(self, now: float) -> bool:
        """True if a pending request is due now (and consume it)."""
        if self.pending and now - self._last >= self.interval:
            self._last = now
            self.pending = False
            return True
        return False
