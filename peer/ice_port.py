"""One UDP port for every ICE transport of a node: which transport a datagram is for.

With a shared port (``cascade node --ice-port``, like mediasoup's WebRtcServer) every
participant's transport sends and receives on one socket, so a firewall opens one UDP port
and a packet's fan-out to many subscribers can leave in one ``sendmmsg``. The socket hands
each datagram to :meth:`IcePortRoutes.route`, which finds its transport (sans-I/O, no
sockets here):

- a STUN request (a connectivity check, RFC 8445 §7.2.2) names the transport in its
  USERNAME, ``"<our ufrag>:<their ufrag>"``; the sender's address is then learnt for it;
- a STUN response or error is for the transport that sent the request (its transaction id);
- anything else (DTLS, SRTP, SRTCP) by the sender's address, once learnt.

The transport itself still checks every request's integrity; learning an address from a
forged request only routes that address's own datagrams to a transport that drops them.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

Member = TypeVar("Member", bound=Hashable)
Address = tuple[str, int]

_STUN_HEADER = 20
_STUN_COOKIE = b"\x21\x12\xa4\x42"
_USERNAME = 0x0006
# Transaction ids of our own requests kept for routing their responses (checks and consent
# every few seconds per transport; the oldest are forgotten first).
MAX_TRANSACTIONS = 8192


def is_stun(data: bytes) -> bool:
    """Whether a datagram is STUN by its first byte and magic cookie (RFC 7983)."""
    return len(data) >= _STUN_HEADER and data[0] < 4 and data[4:8] == _STUN_COOKIE


def stun_username(data: bytes) -> str | None:
    """The USERNAME attribute of a STUN message (None if absent or malformed)."""
    end = _STUN_HEADER + int.from_bytes(data[2:4], "big")
    if end > len(data):
        return None
    offset = _STUN_HEADER
    while offset + 4 <= end:
        kind = int.from_bytes(data[offset : offset + 2], "big")
        size = int.from_bytes(data[offset + 2 : offset + 4], "big")
        value = data[offset + 4 : offset + 4 + size]
        if len(value) < size:
            return None
        if kind == _USERNAME:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return None
        offset += 4 + (size + 3) // 4 * 4
    return None


def _is_request(data: bytes) -> bool:
    # class bits C1 (0x0100) and C0 (0x0010) of the message type both clear
    return (data[0] & 0x01) == 0 and (data[1] & 0x10) == 0


class IcePortRoutes(Generic[Member]):
    """The transports sharing one port, and what routes a datagram to each."""

    def __init__(self, max_transactions: int = MAX_TRANSACTIONS) -> None:
        self._by_ufrag: dict[str, Member] = {}
        self._by_address: dict[Address, Member] = {}
        self._by_transaction: dict[bytes, Member] = {}
        self._addresses: dict[Member, set[Address]] = {}
        self._max_transactions = max_transactions
        self.unroutable = 0

    def __len__(self) -> int:
        return len(self._addresses)

    def members(self) -> list[Member]:
        """Every member on the port."""
        return list(self._addresses)

    def member_of(self, ufrag: str) -> Member | None:
        """The member checks naming ``ufrag`` go to (None: nobody)."""
        return self._by_ufrag.get(ufrag)

    def add(self, ufrag: str, member: Member) -> None:
        """Route checks naming ``ufrag`` (our side's ICE username fragment) to ``member``."""
        if ufrag in self._by_ufrag and self._by_ufrag[ufrag] != member:
            raise ValueError(f"ICE ufrag {ufrag!r} is already on this port")
        self._by_ufrag[ufrag] = member
        self._addresses.setdefault(member, set())

    def remove(self, member: Member) -> None:
        """Forget ``member`` and everything that routed to it."""
        for address in self._addresses.pop(member, ()):
            if self._by_address.get(address) == member:
                del self._by_address[address]
        for ufrag in [k for k, m in self._by_ufrag.items() if m == member]:
            del self._by_ufrag[ufrag]
        for transaction in [k for k, m in self._by_transaction.items() if m == member]:
            del self._by_transaction[transaction]

    def sent(self, member: Member, data: bytes) -> None:
        """``member`` sent ``data``: if it is a STUN request, route its responses back."""
        if member in self._addresses and is_stun(data) and _is_request(data):
            transactions = self._by_transaction
            transactions[data[8:20]] = member
            if len(transactions) > self._max_transactions:
                del transactions[next(iter(transactions))]

    def route(self, data: bytes, address: Address) -> Member | None:
        """The member a datagram from ``address`` is for (None: nobody; counted)."""
        member: Member | None
        if data and data[0] < 4 and is_stun(data):
            if _is_request(data):
                username = stun_username(data)
                member = None
                if username is not None:
                    member = self._by_ufrag.get(username.partition(":")[0])
                if member is not None:
                    self._learn(address, member)
            else:
                member = self._by_transaction.get(data[8:20])
                if member is None:
                    member = self._by_address.get(address)
        else:
            member = self._by_address.get(address)
        if member is None:
            self.unroutable += 1
        return member

    def _learn(self, address: Address, member: Member) -> None:
        previous = self._by_address.get(address)
        if previous == member:
            return
        if previous is not None:
            self._addresses[previous].discard(address)
        self._by_address[address] = member
        self._addresses[member].add(address)
