"""Who may hold a relay link to this node and pull which producers (sans-I/O, time passed in).

A key may connect while the directory holds a live (unexpired, not withdrawn) node record
whose relay key it is; statically configured peer keys always may. In open mode a node may
pull only producers of rooms for which it has itself announced participants (its room
entry is in the directory); in fleet mode every record is operator-certified, so any live
node may pull. See docs/security.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class _KeyGrant:
    node_id: bytes
    expires_at: float
    withdrawn: bool = False


class RelayAccess:
    """The relay access policy, fed with what the overlay reads from the directory."""

    def __init__(
        self,
        static_keys: Iterable[bytes] = (),
        *,
        open_mode: bool = True,
        host_lifetime: float = 10.0,
    ) -> None:
        self.static_keys = static_keys
        self.open_mode = open_mode
        #: a room host seen in a lookup stays one this long (a room entry's lifetime), so
        #: that a lookup that started earlier cannot undo what a newer one found
        self.host_lifetime = host_lifetime
        self._grants: dict[bytes, _KeyGrant] = {}
        self._room_hosts: dict[str, dict[bytes, float]] = {}

    # -- what the directory says ---------------------------------------------------------

    def seen(self, key: bytes, node_id: bytes, expires_at: float) -> None:
        """A live node record with relay key ``key``, expiring at ``expires_at``."""
        grant = self._grants.get(key)
        if grant is None or grant.withdrawn or grant.node_id != node_id:
            self._grants[key] = _KeyGrant(node_id, expires_at)
        else:
            grant.expires_at = max(grant.expires_at, expires_at)

    def missing(self, key: bytes) -> None:
        """A lookup of the node of ``key`` found no live record (withdrawn or expired)."""
        grant = self._grants.get(key)
        if grant is not None:
            grant.withdrawn = True

    def room_hosts(self, room: str, node_ids: Iterable[bytes], now: float) -> None:
        """A lookup at ``now`` found these nodes' room entries for ``room`` announcing
        participants."""
        hosts = self._room_hosts.setdefault(room, {})
        for node_id in node_ids:
            hosts[node_id] = now
        for node_id, seen in list(hosts.items()):
            if now - seen > self.host_lifetime:
                del hosts[node_id]

    def forget_room(self, room: str) -> None:
        """``room`` has no local participants any more."""
        self._room_hosts.pop(room, None)

    # -- decisions -----------------------------------------------------------------------

    def node_of(self, key: bytes, now: float) -> bytes | None:
        """The node id of ``key`` while it may hold a relay link (None for static keys)."""
        grant = self._grants.get(key)
        if grant is None or not self.allowed(key, now):
            return None
        return grant.node_id

    def tracked(self) -> list[tuple[bytes, bytes]]:
        """(key, node id) of every key currently granted."""
        return [(key, g.node_id) for key, g in self._grants.items()]

    def allowed(self, key: bytes, now: float) -> bool:
        """Whether ``key`` may hold a relay link at ``now``."""
        if key in self.static_keys:
            return True
        grant = self._grants.get(key)
        return grant is not None and not grant.withdrawn and grant.expires_at > now

    def may_pull(self, key: bytes, room: str, now: float) -> bool:
        """Whether ``key`` may subscribe to a producer of ``room`` at ``now``."""
        if key in self.static_keys:
            return True
        if not self.allowed(key, now):
            return False
        if not self.open_mode:
            return True
        seen = self._room_hosts.get(room, {}).get(self._grants[key].node_id)
        return seen is not None and now - seen <= self.host_lifetime

    def revoke_due(self, now: float) -> list[bytes]:
        """Keys granted before and no longer allowed (each reported once, then forgotten)."""
        gone = [key for key in self._grants if not self.allowed(key, now)]
        for key in gone:
            del self._grants[key]
        return [key for key in gone if key not in self.static_keys]
