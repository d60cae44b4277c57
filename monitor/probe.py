"""Reads a running node's counters (engine, relay, DHT) into plain rows and totals.

Everything here runs at scrape or sample time; nothing touches the per-packet path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dht import node_id_from_public_key
from peer import aiortc_adapter as rtc

if TYPE_CHECKING:
    from dht import Directory
    from peer.server import NodeServer

# Values kept per stream in the ledger, in this order.
STREAM_COUNTERS = ("packets", "bytes", "nacks", "plis", "retransmits", "keyframes", "drops")
# Values kept per relay flow (remote side) in the ledger, in this order.
RELAY_IN_COUNTERS = ("packets", "bytes", "lost", "repaired", "nacks_sent")
# Values kept per origin flow (served to a peer), in this order.
RELAY_OUT_COUNTERS = ("packets", "bytes", "retransmits", "dropped")


@dataclass(slots=True)
class StreamRow:
    """One producer (direction ``in``) or consumer (direction ``out``) on this node."""

    id: str
    direction: str
    kind: str
    room: str
    participant_id: str
    producer_id: str
    origin: str
    stats: Any  # peer.stats.StreamStats
    drops: int

    def counters(self) -> tuple[int, ...]:
        s = self.stats
        return (s.packets, s.bytes, s.nacks, s.plis, s.retransmits, s.keyframes, self.drops)


def short_id(node_id: bytes) -> str:
    """The node id as shown in labels and on the dashboard (16 hex digits)."""
    return node_id.hex()[:16]


def peer_node_id(public_key: bytes | None) -> str:
    """Node id (short hex) of a relay peer's Ed25519 key."""
    if not public_key:
        return "unknown"
    try:
        return short_id(node_id_from_public_key(public_key))
    except Exception:
        return public_key.hex()[:16]


def streams(server: NodeServer) -> Iterator[StreamRow]:
    """Every producer and consumer of every room on the node."""
    for room, router in list(server.node.routers.items()):
        for producer in list(router.producers.values()):
            receiver = getattr(producer, "receiver", None)
            if receiver is not None:
                try:
                    _, lost, jitter = rtc.receiver_loss(receiver)
                    producer.stats.packets_lost = lost
                    producer.stats.jitter = jitter / producer.codec.clock_rate
                except Exception:
                    pass
            yield StreamRow(
                producer.id,
                "in",
                producer.kind,
                room,
                producer.participant_id,
                producer.id,
                producer.origin,
                producer.stats,
                0,
            )
        for consumer in list(router.consumers.values()):
            yield StreamRow(
                consumer.id,
                "out",
                consumer.kind,
                room,
                consumer.subscriber_id,
                consumer.producer.id,
                consumer.producer.origin,
                consumer.stats,
                int(getattr(consumer.sink, "dropped", 0)),
            )


def relay_links(server: NodeServer) -> list[dict[str, Any]]:
    """Outbound relay links (this node pulls from the peer) with their flows."""
    relay = server.relay
    if relay is None:
        return []
    out = []
    for key, link in relay.links.items():
        producers = link.producers
        out.append(
            {
                "peer": peer_node_id(key),
                "state": link.state,
                "rtt": link.rtt,
                "flows": len(producers),
                "connects": link.connects,
                "disconnects": link.disconnects,
                "producers": {
                    pid: tuple(getattr(rp.stats, name) for name in RELAY_IN_COUNTERS)
                    for pid, rp in producers.items()
                },
            }
        )
    return out


def origin_flows(server: NodeServer) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """``(peer, producer_id, flow_id, counters)`` of each flow this node serves to peers."""
    relay = server.relay
    if relay is None:
        return []
    return [
        (peer_node_id(key), pid, fid, tuple(getattr(stats, n) for n in RELAY_OUT_COUNTERS))
        for key, pid, fid, stats in relay.origin_flows()
    ]


def dht_counters(directory: Directory | None) -> dict[str, Any] | None:
    """Lookups, storage and traffic of the node's DHT server (None without a directory)."""
    if directory is None:
        return None
    server = directory.server
    protocol = server.protocol
    traffic = getattr(protocol, "traffic", None)
    return {
        "lookups": server.lookups,
        "records": len(server.storage),
        "refused": {reason.name.lower(): n for reason, n in server.storage.rejected.items()},
        "contacts": server.contacts if protocol is not None else 0,
        "bytes_sent": getattr(traffic, "bytes_sent", 0),
        "bytes_received": getattr(traffic, "bytes_received", 0),
    }
