"""Failover as plain policy: when a node counts as dead, and how clients retry.

No I/O and no clock. The overlay reports what it sees of each peer node (relay link up or
down, directory record present or gone) with ``now``; :class:`OriginWatch` says which
nodes to treat as dead. Clients space their reconnection attempts with :class:`Backoff`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Delays between reconnection attempts: exponential, capped, with full jitter so that
    the participants of a dead node do not all arrive at the same moment."""

    first: float = 0.25
    factor: float = 2.0
    cap: float = 5.0

    def delay(self, attempt: int, draw: float) -> float:
        """Seconds to wait before attempt ``attempt`` (0-based), for ``draw`` in [0, 1)."""
        ceiling = min(self.cap, self.first * self.factor**attempt)
        return ceiling * draw


@dataclass
class OriginWatch:
    """Which peer nodes are dead, from direct evidence.

    A node is dead when its directory record is gone, or when a relay link to it has been
    down for ``link_deadline`` seconds. A dead node comes back only with a record that
    expires later than the one it had when it was declared dead (it refreshed it, or it
    restarted), so a stale copy read from the DHT does not revive it.
    """

    link_deadline: float = 3.0
    _down_since: dict[bytes, float] = field(default_factory=dict)
    _dead: dict[bytes, float] = field(default_factory=dict)  # node -> record expiry at death
    _expiry: dict[bytes, float] = field(default_factory=dict)

    def link_down(self, node: bytes, now: float) -> None:
        """A relay link to ``node`` was lost (or its reconnection failed)."""
        if node not in self._dead:
            self._down_since.setdefault(node, now)

    def link_up(self, node: bytes) -> None:
        """A relay link to ``node`` is authenticated again."""
        self._down_since.pop(node, None)
        self._dead.pop(node, None)

    def record_seen(self, node: bytes, expires_at: float) -> None:
        """The directory lists ``node`` with a record valid until ``expires_at``."""
        self._expiry[node] = max(expires_at, self._expiry.get(node, 0.0))
        dead = self._dead.get(node)
        if dead is not None and expires_at > dead:
            del self._dead[node]

    def record_gone(self, node: bytes) -> None:
        """The directory no longer lists ``node`` (withdrawn or expired)."""
        self._down_since.pop(node, None)
        self._dead[node] = self._expiry.pop(node, 0.0)

    def poll(self, now: float) -> list[bytes]:
        """Nodes whose links have been down past the deadline at ``now`` (each reported
        once; from then on :meth:`is_dead`)."""
        newly = [n for n, t in self._down_since.items() if now >= t + self.link_deadline]
        for node in newly:
            del self._down_since[node]
            self._dead[node] = self._expiry.get(node, 0.0)
        return newly

    def deadline(self) -> float | None:
        """When :meth:`poll` may next report a node."""
        if not self._down_since:
            return None
        return min(self._down_since.values()) + self.link_deadline

    def is_dead(self, node: bytes) -> bool:
        """Whether ``node`` is treated as dead now."""
        return node in self._dead

    @property
    def dead(self) -> frozenset[bytes]:
        """Nodes treated as dead."""
        return frozenset(self._dead)
