"""The relay's media congestion control, driven without a connection: packets sent, then
ACKed or lost, at a steady rate over a path of fixed RTT."""

from __future__ import annotations

import random

from aioquic import tls
from aioquic.quic.congestion.base import create_congestion_control
from aioquic.quic.packet import QuicPacketType
from aioquic.quic.packet_builder import QuicSentPacket

from relay.congestion import MEDIA, MediaCongestionControl

MSS = 1200
RTT = 0.08


class Flow:
    """A flow of ``rate`` packets/s, each ACKed or lost one RTT after it was sent, but
    never more in flight than the controller's window (the rest waits at the origin)."""

    def __init__(self, cc: MediaCongestionControl, rate: float, loss: float, seed: int = 1):
        self.cc, self.rate, self.loss = cc, rate, loss
        self.rng = random.Random(seed)
        self.in_flight: list[QuicSentPacket] = []
        self.pn = 0
        self.now = 0.0
        self.sent = 0
        self.held = 0

    def run(self, seconds: float, tick: float = 0.005) -> None:
        for _ in range(int(seconds / tick)):
            self.now += tick
            due = [p for p in self.in_flight if (p.sent_time or 0.0) + RTT <= self.now]
            self.in_flight = [p for p in self.in_flight if p not in due]
            lost = [p for p in due if self.rng.random() < self.loss]
            for p in due:
                if p not in lost:
                    self.cc.on_packet_acked(now=self.now, packet=p)
            if due:
                self.cc.on_rtt_measurement(now=self.now, rtt=RTT)
            if lost:
                self.cc.on_packets_lost(now=self.now, packets=lost)
            for _ in range(round(self.rate * tick)):
                if self.cc.bytes_in_flight + MSS > self.cc.congestion_window:
                    self.held += 1
                    continue
                p = QuicSentPacket(
                    epoch=tls.Epoch.ONE_RTT,
                    in_flight=True,
                    is_ack_eliciting=True,
                    is_crypto_packet=False,
                    packet_number=self.pn,
                    packet_type=QuicPacketType.ONE_RTT,
                    sent_time=self.now,
                    sent_bytes=MSS,
                )
                self.pn += 1
                self.cc.on_packet_sent(packet=p)
                self.in_flight.append(p)
                self.sent += 1


def media() -> MediaCongestionControl:
    cc = create_congestion_control(MEDIA, max_datagram_size=MSS)
    assert isinstance(cc, MediaCongestionControl)
    return cc


def test_random_loss_of_a_few_percent_does_not_throttle_the_flow() -> None:
    # 2000 packets/s over 80 ms: 160 packets in flight; NewReno gets ~1/10 of it at 1 %
    for loss in (0.01, 0.03):
        flow = Flow(media(), rate=2000, loss=loss)
        flow.run(1.5)  # slow start, and growth after it if the loss ended it
        held = flow.held
        flow.run(5.0)
        assert flow.held == held, f"held back at {loss:.0%} loss"
        assert flow.cc.decreases == 0
        assert flow.cc.congestion_window >= 160 * MSS


def test_heavy_loss_shrinks_the_window() -> None:
    flow = Flow(media(), rate=2000, loss=0.0)
    flow.run(1.0)
    before = flow.cc.congestion_window
    flow.loss = 0.3
    flow.run(1.0)
    assert flow.cc.decreases >= 3
    assert flow.cc.congestion_window < before / 2
    assert flow.cc.loss_fraction > 0.1


def test_between_two_and_ten_percent_the_window_holds() -> None:
    flow = Flow(media(), rate=2000, loss=0.0)
    flow.run(1.0)
    window = flow.cc.congestion_window
    flow.loss = 0.05
    sent, held = flow.sent, flow.held
    flow.run(5.0)
    # a sample of ~160 packets can show more than 10 % now and then: small dips only
    assert flow.cc.congestion_window >= 0.8 * window
    assert flow.held - held < 0.01 * (flow.sent - sent)
    flow.loss = 0.0
    flow.run(2.0)
    assert flow.cc.congestion_window >= window


def test_an_application_limited_flow_keeps_a_window_near_its_needs() -> None:
    flow = Flow(media(), rate=200, loss=0.0)  # 16 packets in flight
    flow.run(1.0)  # the initial window is 10 packets
    held = flow.held
    flow.run(5.0)
    assert flow.held == held
    assert flow.cc.congestion_window <= 4 * 20 * MSS


def test_persistent_congestion_restarts_from_the_minimum_window_in_slow_start() -> None:
    flow = Flow(media(), rate=2000, loss=0.0)
    flow.run(1.0)
    flow.cc.on_persistent_congestion()
    assert flow.cc.congestion_window == 2 * MSS
    assert flow.cc.ssthresh is None
    flow.run(1.0)
    assert flow.cc.congestion_window >= 160 * MSS


def test_relay_connections_use_it_by_default() -> None:
    from relay import RelayConfig

    assert RelayConfig().congestion_control == MEDIA
