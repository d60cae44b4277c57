"""Congestion control for relay connections: media, not bulk data (sans-I/O).

A relay connection carries RTP whose rate the publishers choose; QUIC never retransmits its
DATAGRAM frames, and the flows repair what matters with NACKs. A loss-based controller made
for bulk transfers (aioquic's NewReno, CUBIC) halves its window on every loss, so ordinary
random loss on a long path throttles the relay far below the media rate: at 80 ms RTT and
1 % loss NewReno carries about 1.5 Mbit/s, and what is beyond it waits and is dropped at
the origin. Measured with NewReno over 80 ms RTT: a 2.2 Mbit/s producer lost 12 % of its
packets at 1 % loss and 49 % at 3 %; a 17.6 Mbit/s relay delivered half its packets at 1 %,
seconds late.

:class:`MediaCongestionControl` reacts to the loss *fraction*, as the loss-based part of
WebRTC's Google Congestion Control does, measured over at least ``SAMPLE_PACKETS`` packets
and one round trip (``MIN_INTERVAL`` at least). Above ``LOSS_HIGH`` (10 %) the window
shrinks by half the fraction. Below it the window grows: in slow start (doubling per round
trip) until the RTT rises (queues building) or the window first shrinks, then by about an
eighth per round trip, so random loss of a few percent never slows a flow's start. The
window grows only while at least a quarter of it is in use: an application-limited flow
keeps a window near what it needs instead of one that grows without end. Persistent
congestion (nothing ACKed for several PTOs) restarts from the minimum window in slow start.
"""

from __future__ import annotations

from collections.abc import Iterable

from aioquic.quic.congestion.base import (
    K_MINIMUM_WINDOW,
    QuicCongestionControl,
    QuicRttMonitor,
    register_congestion_control,
)
from aioquic.quic.packet_builder import QuicSentPacket

__all__ = [
    "LOSS_HIGH",
    "MEDIA",
    "MIN_INTERVAL",
    "SAMPLE_PACKETS",
    "MediaCongestionControl",
]

#: Its name in aioquic's registry (``QuicConfiguration.congestion_control_algorithm``).
MEDIA = "cascade-media"
#: Above this loss fraction the window shrinks.
LOSS_HIGH = 0.10
#: Fewest packets (ACKed + lost) a loss fraction is measured over.
SAMPLE_PACKETS = 100
#: Shortest time a loss fraction is measured over, when the RTT is shorter.
MIN_INTERVAL = 0.1


class MediaCongestionControl(QuicCongestionControl):
    """Loss-fraction congestion control for relay connections (see the module)."""

    def __init__(self, *, max_datagram_size: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._mss = max_datagram_size
        self._minimum = K_MINIMUM_WINDOW * max_datagram_size
        self._acked = 0
        self._lost = 0
        self._since: float | None = None
        self._rtt = 0.0
        self._stash = 0
        self._rtt_monitor = QuicRttMonitor()
        #: the last measured loss fraction
        self.loss_fraction = 0.0
        #: times the window shrank for loss
        self.decreases = 0

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        self.bytes_in_flight += packet.sent_bytes

    def on_packets_expired(self, *, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes

    def on_packet_acked(self, *, now: float, packet: QuicSentPacket) -> None:
        size = packet.sent_bytes
        in_use = self.bytes_in_flight
        self.bytes_in_flight -= size
        self._acked += 1
        self._measure(now)
        if self.loss_fraction > LOSS_HIGH or in_use * 4 < self.congestion_window:
            return  # shrinking, or the flow does not use the window it has
        if self.ssthresh is None:
            self.congestion_window += size  # slow start: doubles per round trip
        else:
            self._stash += size
            if self._stash >= 8 * self._mss:  # about +12 % per round trip
                self._stash -= 8 * self._mss
                self.congestion_window += self._mss

    def on_packets_lost(self, *, now: float, packets: Iterable[QuicSentPacket]) -> None:
        for packet in packets:
            self.bytes_in_flight -= packet.sent_bytes
            self._lost += 1
        self._measure(now)

    def on_persistent_congestion(self) -> None:
        self.congestion_window = self._minimum
        self.ssthresh = None
        self._acked = self._lost = 0
        self._since = None
        self.loss_fraction = 0.0

    def on_rtt_measurement(self, *, now: float, rtt: float) -> None:
        self._rtt = rtt if not self._rtt else 0.875 * self._rtt + 0.125 * rtt
        if self.ssthresh is None and self._rtt_monitor.is_rtt_increasing(now=now, rtt=rtt):
            self.ssthresh = self.congestion_window  # queues are building: leave slow start

    def _measure(self, now: float) -> None:
        if self._since is None:
            self._since = now
            return
        total = self._acked + self._lost
        if total < SAMPLE_PACKETS or now - self._since < max(self._rtt, MIN_INTERVAL):
            return
        fraction = self.loss_fraction = self._lost / total
        if fraction > LOSS_HIGH:
            self.congestion_window = max(
                self._minimum, int(self.congestion_window * (1 - fraction / 2))
            )
            self.ssthresh = self.congestion_window
            self.decreases += 1
        self._acked = self._lost = 0
        self._since = now

    def get_log_data(self) -> dict[str, object]:
        data = super().get_log_data()
        data["loss_fraction"] = self.loss_fraction
        return data


register_congestion_control(MEDIA, MediaCongestionControl)
