"""Rate and connection-count limits with time passed in (sans-I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBuckets:
    """Per-key token buckets with time passed in; idle keys are forgotten."""

    rate: float
    burst: float
    idle: float = 60.0
    max_keys: int = 100_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, key: str, now: float) -> bool:
        """Take one token for ``key`` if it has one."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self.expire(now)
            if len(self._buckets) >= self.max_keys:
                return False
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def expire(self, now: float) -> None:
        """Forget keys whose bucket has been full (idle) for a while."""
        for key, (_, last) in list(self._buckets.items()):
            if now - last > self.idle:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class ConnectionCounts:
    """Open connections per source and in total, against a limit for each
    (``max_per_source`` 0: no per-source limit)."""

    max_total: int
    max_per_source: int
    total: int = 0
    per_source: dict[str, int] = field(default_factory=dict)

    def admit(self, source: str) -> str | None:
        """Count a new connection, or return why it is refused (``total`` / ``per_source``)."""
        if self.total >= self.max_total:
            return "total"
        if self.max_per_source and self.per_source.get(source, 0) >= self.max_per_source:
            return "per_source"
        self.total += 1
        self.per_source[source] = self.per_source.get(source, 0) + 1
        return None

    def release(self, source: str) -> None:
        """A counted connection closed."""
        self.total -= 1
        left = self.per_source.get(source, 0) - 1
        if left > 0:
            self.per_source[source] = left
        else:
            self.per_source.pop(source, None)
