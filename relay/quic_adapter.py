"""Every use of aioquic internals lives here (pinned: aioquic 1.7.2). The rest of the relay
talks to aioquic through its public API and the helpers below.

What we rely on, and why:

- Fast path (:class:`DatagramFastPath`; on by default, off with
  ``RelayConfig.quic_fast_path = False`` or ``CASCADE_RELAY_FAST_PATH=0``): in the steady
  state of an established 1-RTT connection, packets that carry only DATAGRAM frames (plus
  an ACK when one is due) are built, and short-header packets whose frames are only
  DATAGRAM / ACK / PADDING / PING are parsed, here instead of in
  ``QuicConnection.datagrams_to_send`` / ``receive_datagram`` (pure Python, 30-50 µs per
  packet). Cryptography is aioquic's own, from ``QuicConnection._cryptos[Epoch.ONE_RTT]``
  (a ``CryptoPair``): its ``send`` / ``recv`` contexts' ``aead._aead`` (the AES-GCM or
  ChaCha20 object of ``cryptography``) with ``aead._iv`` for the nonce, ``hp._mask`` for
  header protection and ``key_phase``; ``CryptoPair.encrypt_packet`` (which performs
  the update) when ``_update_key_requested``. aioquic's state stays the authority and is
  updated exactly as its own code does:

  * sending: ``_packet_number``, ``_spin_bit``, ``_peer_cid.cid``, ``_datagrams_pending``
    (the DATAGRAM queue both paths drain, in order), ``_network_paths[0]`` (``addr``,
    ``bytes_sent``), ``_max_datagram_size``, ``_pacing_at``, ``_close_at`` /
    ``_ack_eliciting_sent_since_receipt`` / ``_idle_timeout()`` (idle timer),
    ``_spaces[Epoch.ONE_RTT]`` (``ack_at``, ``ack_queue``, ``largest_received_*``),
    ``_local_ack_delay_exponent``, ``_on_ack_delivery`` (delivery handler of an ACK
    frame, trims the ACK ranges once acknowledged), ``_loss.on_packet_sent`` with a
    ``QuicSentPacket`` (loss recovery and congestion control see every packet),
    ``_loss.congestion_window`` / ``bytes_in_flight`` and ``_loss._pacer``;
  * receiving: ``host_cid``, ``_spaces[Epoch.ONE_RTT]`` (``expected_packet_number``,
    ``received_packets``, ``ack_queue``, ``largest_received_*``, ``ack_at``),
    ``_ack_delay``, ``_spin_highest_pn`` / ``_spin_bit`` / ``_is_client``,
    ``_remote_ack_delay_exponent``, ``_configuration.max_datagram_frame_size``,
    ``_loss.peer_completed_address_validation`` and ``_loss.on_ack_received`` (RTT, loss
    detection, congestion control, delivery handlers), ``_close_at`` / ``_idle_timeout()``.
  * timers: ``_loss_at`` and ``_close_at`` (whether a timer that fired may have queued
    retransmissions or probes);
  * the steady state (:meth:`DatagramFastPath.steady`) reads ``_state``,
    ``_handshake_confirmed``, ``_close_pending``, ``_network_paths``, ``_quic_logger``,
    ``_peer_cid.sequence_number``, ``_remote_preferred_address``,
    ``_remote_max_datagram_frame_size`` and the 0-RTT keys in ``_cryptos``.

  Anything else goes to aioquic's own path: handshakes, long headers, other frames,
  a key phase change, an unknown connection id or address (migration), reserved bits,
  packets that fail to parse. aioquic's sender also runs on the next transmit after
  anything that may have queued other frames: a packet it parsed, a loss-detection or
  idle timer, a control-stream write or a close, the loss of a packet that had delivery
  handlers (``_loss._on_packets_lost`` is wrapped per connection to see it); and again
  on each transmit while, held back by the congestion window or pacing, it still has
  such frames: :meth:`DatagramFastPath._aioquic_has_frames` reads what its
  ``_write_application`` would write (``_close_pending``, ``_handshake_done_pending``,
  ``_ping_pending``, ``_probe_pending``, ``_streams_blocked_pending``,
  ``_retire_connection_ids``, ``_host_cids[].was_sent``, the path's
  ``remote_challenges``, the 1-RTT ``_crypto_streams`` sender, ``_local_max_data`` /
  ``_local_max_streams_*`` limits, each stream's ``max_stream_data_local*`` and
  receiver ``highest_offset``, and ``_streams_queue``: finished, stop/reset pending,
  unsent data).
- ``QuicConnection._loss._pacer`` is replaced by :class:`BurstPacer` (see there).
- ``QuicConnection._ack_delay`` (how long an ACK may wait; aioquic 1 ms) is set by
  :class:`DatagramFastPath` from its :class:`relay.acks.AckPolicy` (aioquic's general
  path then delays its ACKs as the fast path does).
- ``QuicConnection.tls._peer_certificate``: the verified peer certificate (its key is the
  node identity; None makes the relay handshake fail closed).
- :class:`QuicProtocolBase` subclasses ``aioquic.asyncio.QuicConnectionProtocol`` and uses
  its ``_quic``, ``_loop``, ``_transport``, ``_timer`` / ``_timer_at`` / ``_transmit_task``
  (its timer), ``_closed`` and ``_connection_id_issued_handler`` /
  ``_connection_id_retired_handler`` / ``_connection_terminated_handler`` (set by
  ``QuicServer``); it replaces ``_process_events`` and ``_handle_timer``.
- :class:`AdmittingQuicServer` reads ``QuicServer._configuration``, ``_loop``, ``_protocols`` (is a
  connection id known; a short-header packet goes straight to its protocol, as aioquic's
  server would after parsing the header) and ``_transport``.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from aioquic import tls
from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicFrameType,
    QuicPacketType,
    decode_packet_number,
    pull_ack_frame,
    pull_quic_header,
    push_ack_frame,
)
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import MAX_ACK_RANGES, QuicPacketPacer, QuicPacketSpace
from cryptography.exceptions import InvalidTag

from .acks import AckPolicy, AckSettings
from .udp import DrainingDatagramTransport

__all__ = [
    "FAST_PATH_ENV",
    "PACING_BURST",
    "TIMER_SLACK",
    "AdmittingQuicServer",
    "BurstPacer",
    "DatagramFastPath",
    "QuicProtocolBase",
    "fast_path_enabled",
    "peer_certificate",
    "use_burst_pacer",
]

#: Environment variable that turns the fast path off when set to ``0`` (same-run baselines).
FAST_PATH_ENV = "CASCADE_RELAY_FAST_PATH"

#: Packets a relay connection may send back to back before pacing spaces them.
PACING_BURST = 16

#: An armed QUIC timer this much earlier than the next deadline is kept (re-arming costs
#: a cancel and a ``call_at``); one earlier than that is moved, as a wake-up for nothing
#: costs more on an idle machine.
TIMER_SLACK = 0.002

_ONE_RTT = tls.Epoch.ONE_RTT
_ZERO_RTT = tls.Epoch.ZERO_RTT
_SHORT = QuicPacketType.ONE_RTT
_CONNECTED = QuicConnectionState.CONNECTED
_AEAD_TAG = 16
_PN_SEND_SIZE = 2  # as aioquic's builder: packet numbers on 2 bytes
_MIN_PAYLOAD = 4 - _PN_SEND_SIZE  # header protection samples 4 bytes after the pn offset
_ACK_CAPACITY = 1 + 4 * 8  # aioquic's ACK_FRAME_CAPACITY
_DATAGRAM = int(QuicFrameType.DATAGRAM_WITH_LENGTH)
_DATAGRAM_NO_LEN = int(QuicFrameType.DATAGRAM)
_ACK = int(QuicFrameType.ACK)
_PADDING = int(QuicFrameType.PADDING)
_PING = int(QuicFrameType.PING)
_NO_PAYLOADS: tuple[bytes, ...] = ()


def fast_path_enabled(configured: bool = True) -> bool:
    """``configured``, unless :data:`FAST_PATH_ENV` is ``0`` (then False)."""
    return configured and os.environ.get(FAST_PATH_ENV, "1") != "0"


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer, allowing bursts of :data:`PACING_BURST` packets.

    aioquic 1.7 allows a burst of a quarter of the congestion window (2 to 16 packets),
    expressed in time at the pacing rate (window / RTT), with each packet's time floored
    at 1 µs. Media arrives in frame-sized bursts (10-20 packets every few ms). With a
    small window (start, after a loss) a burst is cut into packets that each wait for a
    pacing timer; with a large one — an app-limited flow never loses, so its window grows
    in slow start forever — the allowance on a sub-millisecond link falls below one
    floored packet time and *every* packet waits for its own timer: one event-loop
    iteration and one transmit per packet. The congestion window still bounds what is in
    flight; only the spacing inside a burst is given up.
    """

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        """aioquic's rate, with a burst allowance of at least :data:`PACING_BURST` packets."""
        super().update_rate(congestion_window, smoothed_rtt)
        if self.packet_time is not None:
            self.bucket_max = max(self.bucket_max, PACING_BURST * self.packet_time)


def use_burst_pacer(quic: QuicConnection) -> None:
    """Give ``quic`` a :class:`BurstPacer` (if aioquic's pacer moved, the stock one stays:
    correct, only slower)."""
    loss = getattr(quic, "_loss", None)
    pacer = getattr(loss, "_pacer", None)
    if isinstance(pacer, QuicPacketPacer) and not isinstance(pacer, BurstPacer):
        loss._pacer = BurstPacer(max_datagram_size=pacer._max_datagram_size)  # type: ignore[union-attr]


def peer_certificate(quic: QuicConnection) -> Any:
    """The peer's certificate once the handshake completed (None if unknown)."""
    return getattr(getattr(quic, "tls", None), "_peer_certificate", None)


def pending_datagrams(quic: QuicConnection) -> deque[bytes]:
    """The DATAGRAM frames aioquic holds (congestion or pacing), oldest first."""
    pending = getattr(quic, "_datagrams_pending", None)
    return pending if isinstance(pending, deque) else deque()


def _varint(n: int) -> bytes:
    if n < 0x40:
        return bytes((n,))
    if n < 0x4000:
        return (n | 0x4000).to_bytes(2, "big")
    return (n | 0x80000000).to_bytes(4, "big")


class _Fallback(Exception):
    """The packet is for aioquic's general path."""


class DatagramFastPath:
    """Sends and receives DATAGRAM-only 1-RTT packets of one :class:`QuicConnection`.

    Use :meth:`datagrams_to_send`, :meth:`receive_datagram` and :meth:`handle_timer`
    instead of the connection's methods of the same name, and call :meth:`touch` after
    any other call that may queue frames (``send_stream_data``, ``close``, ...). With
    ``enabled`` False every call goes straight to aioquic.
    """

    def __init__(
        self, quic: QuicConnection, enabled: bool = True, acks: AckSettings | None = None
    ) -> None:
        self.quic = quic
        self.enabled = enabled
        #: when the packets received here are ACKed
        self.acks = AckPolicy(acks)
        quic._ack_delay = self.acks.delay
        #: packets built / parsed here, and calls handed to aioquic's general path
        self.packets_sent = 0
        self.packets_received = 0
        self.general_sends = 0
        self.general_receives = 0
        #: packets dropped here: failed authentication, duplicates
        self.rejected = 0
        #: packets aioquic's loss recovery declared lost (either path)
        self.packets_lost = 0
        #: the last received datagram may have moved aioquic's timers other than the ACK's
        self.timers_moved = True
        #: ack-eliciting packets parsed here since the last ACK built here
        self.unacked = 0
        #: ACK frames built here
        self.acks_sent = 0
        self._general_due = True
        self._ready = False
        self._space: QuicPacketSpace | None = None
        self._crypto: CryptoPair | None = None
        self._pending = pending_datagrams(quic)
        self._idle = 0.0
        self._idle_at = 0.0
        loss = quic._loss
        on_lost = loss._on_packets_lost

        def packets_lost(**kw: Any) -> None:
            packets: Iterable[QuicSentPacket] = kw["packets"]
            packets = kw["packets"] = list(packets)
            self.packets_lost += len(packets)
            if any(p.delivery_handlers for p in packets):
                self._general_due = True
            on_lost(**kw)

        loss._on_packets_lost = packets_lost  # type: ignore[method-assign]

    # -- state --------------------------------------------------------------------------

    def touch(self) -> None:
        """Something other than DATAGRAM frames may be queued: next send goes to aioquic."""
        self._general_due = True

    def steady(self) -> bool:
        """True while the connection is in the state the fast path handles."""
        quic = self.quic
        if not self._ready and (not self.enabled or not self._became_ready()):
            return False
        if quic._state is not _CONNECTED or quic._close_pending:
            return False
        paths = quic._network_paths
        return len(paths) == 1 and paths[0].is_validated

    def _became_ready(self) -> bool:
        quic = self.quic
        if (
            quic._quic_logger is not None
            or not quic._handshake_confirmed
            or quic._state is not _CONNECTED
            or quic._peer_cid.sequence_number is None
            or quic._close_at is None
            or quic._remote_preferred_address is not None
            or quic._remote_max_datagram_frame_size is None
            or quic._configuration.max_datagram_frame_size is None
        ):
            return False
        cryptos = quic._cryptos
        crypto = cryptos.get(_ONE_RTT)
        if crypto is None or not crypto.send.is_valid() or not crypto.recv.is_valid():
            return False
        zero = cryptos.get(_ZERO_RTT)
        if zero is not None and zero.recv.is_valid():
            return False  # torn down by aioquic on the first 1-RTT packet (server)
        self._crypto = crypto
        self._space = quic._spaces[_ONE_RTT]
        self._ready = True
        return True

    # -- sending ------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """What the connection has to send now (as ``QuicConnection.datagrams_to_send``)."""
        quic = self.quic
        if not self.steady():
            self._general_due = True
            self.general_sends += 1
            return quic.datagrams_to_send(now=now)
        out: list[tuple[bytes, Any]] = []
        if self._general_due:
            self.general_sends += 1
            out = quic.datagrams_to_send(now=now)
            if self._aioquic_has_frames():
                return out  # held back (window, pacing): its frames go first when it opens
            self._general_due = False
            if not self.steady():
                return out
        space = self._space
        assert space is not None
        ack_at = space.ack_at
        ack_due = ack_at is not None and ack_at <= now
        pending = self._pending
        if not pending and not ack_due:
            return out
        return out + self._build(now, ack_due)

    def _aioquic_has_frames(self) -> bool:
        """Whether aioquic still holds frames other than DATAGRAM and ACK to send (what its
        ``_write_application`` would write, in its order)."""
        q = self.quic
        if (
            q._close_pending
            or q._handshake_done_pending
            or q._ping_pending
            or q._probe_pending
            or q._streams_blocked_pending
            or q._retire_connection_ids
        ):
            return True
        paths = q._network_paths
        if not paths or paths[0].remote_challenges or not paths[0].is_validated:
            return True
        if any(not cid.was_sent for cid in q._host_cids):
            return True
        crypto_stream = q._crypto_streams.get(_ONE_RTT)
        if crypto_stream is not None and not crypto_stream.sender.buffer_is_empty:
            return True
        max_data = q._local_max_data
        if max_data.used * 2 > max_data.value:
            return True
        for limit in (max_data, q._local_max_streams_bidi, q._local_max_streams_uni):
            if limit.sent != limit.value:
                return True
        for stream in q._streams.values():
            local = stream.max_stream_data_local
            if local and (
                stream.receiver.highest_offset * 2 > local
                or stream.max_stream_data_local_sent != local
            ):
                return True
        for stream in q._streams_queue:
            if (
                stream.is_finished
                or stream.receiver.stop_pending
                or stream.sender.reset_pending
                or not stream.sender.buffer_is_empty
            ):
                return True
        return False

    def _build(self, now: float, ack_due: bool) -> list[tuple[bytes, Any]]:
        quic = self.quic
        space = self._space
        crypto = self._crypto
        assert space is not None and crypto is not None
        pending = self._pending
        loss = quic._loss
        pacer = loss._pacer
        path = quic._network_paths[0]
        addr = path.addr
        peer_cid = quic._peer_cid.cid
        overhead = 3 + len(peer_cid) + _AEAD_TAG
        capacity = quic._max_datagram_size - overhead
        out: list[tuple[bytes, Any]] = []
        quic._pacing_at = None
        while pending or ack_due:
            if not ack_due:
                pacing_at = pacer.next_send_time(now=now)
                if pacing_at is not None:
                    quic._pacing_at = pacing_at
                    break
            pn = quic._packet_number
            parts: list[bytes] = []
            size = 0
            handlers: list[tuple[Any, Any]] = []
            eliciting = False
            if ack_due:
                buf = Buffer(capacity=_ACK_CAPACITY + 1)
                buf.push_uint_var(_ACK)
                delay = int((now - (space.largest_received_time or now)) * 1000000)
                ranges = push_ack_frame(
                    buf,
                    space.ack_queue,
                    delay >> quic._local_ack_delay_exponent,
                    _ACK_CAPACITY,
                )
                handlers.append((quic._on_ack_delivery, (space, space.largest_received_packet)))
                space.ack_at = None
                self.unacked = 0
                self.acks_sent += 1
                self.acks.acked()
                ack_due = False
                if ranges > 1 and pn % 8 == 0:  # ACK-of-ACK trigger, as aioquic does
                    buf.push_uint_var(_PING)
                    eliciting = True
                parts.append(buf.data)
                size = buf.tell()
            # DATAGRAM frames count against the congestion window, the ACK does not
            room = min(capacity, loss.congestion_window - loss.bytes_in_flight - overhead)
            while pending:
                data = pending[0]
                n = len(data)
                frame = 1 + (1 if n < 0x40 else 2 if n < 0x4000 else 4) + n
                if size + frame > room:
                    break
                parts.append(b"\x31" + _varint(n))
                parts.append(data)
                size += frame
                pending.popleft()
                eliciting = True
            if not parts:
                break  # congestion-limited: the rest waits for ACKs
            in_flight = eliciting
            if size < _MIN_PAYLOAD:
                parts.append(bytes(_MIN_PAYLOAD - size))
                in_flight = True
            pn16 = pn & 0xFFFF
            if crypto._update_key_requested:
                # aioquic's own call performs the key update it was asked for
                first = 0x41 | (quic._spin_bit << 5) | (crypto.key_phase << 2)
                header = bytes((first,)) + peer_cid + pn16.to_bytes(2, "big")
                packet = crypto.encrypt_packet(header, b"".join(parts), pn)
            else:
                send = crypto.send
                first = 0x41 | (quic._spin_bit << 5) | (send.key_phase << 2)
                header = bytes((first,)) + peer_cid + pn16.to_bytes(2, "big")
                aead = send.aead
                protected = aead._aead.encrypt(  # type: ignore[union-attr]
                    (aead._iv ^ pn).to_bytes(12, "big"),  # type: ignore[union-attr]
                    b"".join(parts),
                    header,
                )
                # header protection; the sample starts 4 bytes after the packet number
                mask = send.hp._mask(protected[2:18])  # type: ignore[union-attr]
                packet = b"".join(
                    (
                        bytes((first ^ (mask[0] & 0x1F),)),
                        peer_cid,
                        (pn16 ^ ((mask[1] << 8) | mask[2])).to_bytes(2, "big"),
                        protected,
                    )
                )
            sent = QuicSentPacket(
                epoch=_ONE_RTT,
                in_flight=in_flight,
                is_ack_eliciting=eliciting,
                is_crypto_packet=False,
                packet_number=pn,
                packet_type=_SHORT,
                sent_time=now,
                sent_bytes=len(packet),
                delivery_handlers=handlers,
            )
            loss.on_packet_sent(packet=sent, space=space)
            quic._packet_number = pn + 1
            if eliciting and not quic._ack_eliciting_sent_since_receipt:
                quic._close_at = now + self._idle_timeout(now)
                quic._ack_eliciting_sent_since_receipt = True
            pacer.update_after_send(now=now)
            path.bytes_sent += len(packet)
            out.append((packet, addr))
            self.packets_sent += 1
        return out

    # -- receiving ----------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> Sequence[bytes]:
        """Take one UDP datagram. Returns the DATAGRAM frame payloads parsed here; a packet
        for aioquic's general path is handed to ``QuicConnection.receive_datagram`` (its
        events then wait in the connection, as usual) and nothing is returned."""
        if self.steady():
            try:
                return self._receive(data, addr, now)
            except _Fallback:
                pass
        self.timers_moved = True
        self.general_receives += 1
        self._general_due = True
        self.quic.receive_datagram(data, addr, now=now)
        return _NO_PAYLOADS

    def _receive(self, data: bytes, addr: Any, now: float) -> list[bytes]:
        quic = self.quic
        host_cid = quic.host_cid
        pn_offset = 1 + len(host_cid)
        if (
            len(data) < pn_offset + 20
            or data[0] & 0xC0 != 0x40
            or data[1:pn_offset] != host_cid
            or addr != quic._network_paths[0].addr
        ):
            raise _Fallback
        crypto = self._crypto
        space = self._space
        assert crypto is not None and space is not None
        recv = crypto.recv
        hp, aead = recv.hp, recv.aead
        if hp is None or aead is None:
            raise _Fallback
        mask = hp._mask(data[pn_offset + 4 : pn_offset + 20])  # header protection
        first = data[0] ^ (mask[0] & 0x1F)
        if first & 0x18 or (first >> 2) & 1 != recv.key_phase:
            raise _Fallback  # reserved bits (aioquic closes) or a key update
        pn_len = (first & 0x03) + 1
        pn_end = pn_offset + pn_len
        truncated = int.from_bytes(data[pn_offset:pn_end], "big") ^ int.from_bytes(
            mask[1 : 1 + pn_len], "big"
        )
        pn = decode_packet_number(truncated, pn_len * 8, space.expected_packet_number)
        header = bytes((first,)) + host_cid + truncated.to_bytes(pn_len, "big")
        try:
            payload = aead._aead.decrypt((aead._iv ^ pn).to_bytes(12, "big"), data[pn_end:], header)
        except InvalidTag:
            self.rejected += 1  # as aioquic: dropped
            return []
        if pn in space.received_packets:
            self.rejected += 1
            return []
        datagrams, ack, eliciting = self._parse(payload)
        self.packets_received += 1
        # aioquic's bookkeeping for a 1-RTT packet, in its order
        if pn > space.expected_packet_number:
            space.expected_packet_number = pn + 1
        if pn > quic._spin_highest_pn:
            spin = bool(first & 0x20)
            quic._spin_bit = spin if not quic._is_client else not spin
            quic._spin_highest_pn = pn
        self.timers_moved = ack is not None
        if ack is not None:
            loss = quic._loss
            loss.peer_completed_address_validation = True
            loss.on_ack_received(
                ack_rangeset=ack[0],
                ack_delay=(ack[1] << quic._remote_ack_delay_exponent) / 1000000,
                now=now,
                space=space,
            )
        quic._close_at = now + self._idle_timeout(now)
        quic._ack_eliciting_sent_since_receipt = False
        largest = space.largest_received_packet
        if pn > largest:
            space.largest_received_packet = pn
            space.largest_received_time = now
        ack_queue = space.ack_queue
        ack_queue.add(pn)
        space.received_packets.add(pn)
        if len(ack_queue) > MAX_ACK_RANGES:
            ack_queue.shift()
        if eliciting:
            self.unacked += 1
            acks = self.acks
            acks.packet(pn, largest)
            # aioquic's general path reads the same delay
            quic._ack_delay = delay = acks.delay
            if space.ack_at is None:
                space.ack_at = now + delay
        return datagrams

    def _parse(self, payload: bytes) -> tuple[list[bytes], Any, bool]:
        """Frames of a payload, or :class:`_Fallback` if any is not ours to handle."""
        datagrams: list[bytes] = []
        ack = None
        eliciting = False
        limit = self.quic._configuration.max_datagram_frame_size or 0
        end = len(payload)
        if not end:
            raise _Fallback  # no frames: aioquic closes with PROTOCOL_VIOLATION
        i = 0
        try:
            while i < end:
                frame_type = payload[i]  # one-byte encodings only; others fall back
                if frame_type == _DATAGRAM:
                    b = payload[i + 1]
                    if b < 0x40:
                        n, j = b, i + 2
                    elif b < 0x80:
                        n, j = ((b & 0x3F) << 8) | payload[i + 2], i + 3
                    elif b < 0xC0:
                        n, j = int.from_bytes(payload[i + 1 : i + 5], "big") & 0x3FFFFFFF, i + 5
                    else:
                        raise _Fallback
                    if j + n > end or j + n - i - 1 >= limit:
                        raise _Fallback
                    datagrams.append(payload[j : j + n])
                    i = j + n
                    eliciting = True
                elif frame_type == _PADDING:
                    i = end - len(payload[i:].lstrip(b"\x00"))
                elif frame_type == _ACK and ack is None:
                    buf = Buffer(data=payload)
                    buf.seek(i + 1)
                    ack = pull_ack_frame(buf)
                    i = buf.tell()
                elif frame_type == _PING:
                    eliciting = True
                    i += 1
                elif frame_type == _DATAGRAM_NO_LEN:
                    if end - i - 1 >= limit:
                        raise _Fallback
                    datagrams.append(payload[i + 1 :])
                    i = end
                    eliciting = True
                else:
                    raise _Fallback  # ACK_ECN, a second ACK, any other frame
        except (IndexError, BufferReadError, ValueError) as exc:
            raise _Fallback from exc
        return datagrams, ack, eliciting

    def _idle_timeout(self, now: float) -> float:
        # aioquic's idle timeout (its configured value, or 3 PTO if larger), refreshed
        # every 100 ms instead of on every packet
        if now >= self._idle_at:
            self._idle = self.quic._idle_timeout()
            self._idle_at = now + 0.1
        return self._idle

    # -- timers -------------------------------------------------------------------------

    def ack_now(self, now: float) -> None:
        """Make the ACK owed for 1-RTT packets due now (sent by the next send)."""
        space = self._space
        if space is not None and space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def ack_deadline(self) -> float | None:
        """When aioquic's ACK for 1-RTT packets is due (None: none owed)."""
        space = self._space
        return space.ack_at if space is not None else None

    def stats(self) -> dict[str, int]:
        """Packets handled here and calls handed to aioquic's general path."""
        return {
            "fast_packets_sent": self.packets_sent,
            "fast_packets_received": self.packets_received,
            "general_sends": self.general_sends,
            "general_receives": self.general_receives,
            "rejected": self.rejected,
            "packets_lost": self.packets_lost,
            "acks_sent": self.acks_sent,
            "ack_gaps": self.acks.gaps,
        }

    def handle_timer(self, now: float) -> None:
        """``QuicConnection.handle_timer``; the next send goes to aioquic's path unless
        only an ACK or pacing timer was due."""
        quic = self.quic
        loss_at = quic._loss_at
        close_at = quic._close_at
        if (
            (loss_at is not None and now >= loss_at)
            or (close_at is not None and now >= close_at)
            or not self.steady()
        ):
            self._general_due = True
        quic.handle_timer(now=now)


class QuicProtocolBase(QuicConnectionProtocol):
    """aioquic's asyncio protocol driven through a :class:`DatagramFastPath`.

    Subclasses implement :meth:`datagram_frame_received` (each DATAGRAM payload, in
    order) and ``quic_event_received`` (every other event). :meth:`transmit` re-arms
    aioquic's timer only if it moved earlier.
    """

    def __init__(
        self,
        quic: QuicConnection,
        fast_path: bool = True,
        acks: AckSettings | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(quic, **kw)
        use_burst_pacer(quic)
        self.fast = DatagramFastPath(quic, fast_path_enabled(fast_path), acks)
        #: the transport calls :meth:`datagrams_drained` after each read (set on connect)
        self.drains = False
        #: times aioquic's timer fired
        self.timer_fires = 0
        self.pending = pending_datagrams(quic)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The transport; :attr:`drains` if it reports the end of each read."""
        super().connection_made(transport)
        self.drains = isinstance(transport, DrainingDatagramTransport)

    @property
    def quic(self) -> QuicConnection:
        """The aioquic connection."""
        return self._quic

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this protocol runs on."""
        return self._loop

    def datagram_frame_received(self, data: bytes) -> None:
        """One DATAGRAM frame's payload (override)."""

    def datagrams_drained(self) -> None:
        """The end of a read of the socket (called by
        :class:`relay.udp.DrainingDatagramTransport`, or by :class:`AdmittingQuicServer`
        for the connections that received in it): ACK now if the fast path's
        :class:`relay.acks.AckPolicy` says so (a burst then costs the receiver one
        wake-up, not two), else arm the timers (once per read, not per datagram)."""
        fast = self.fast
        if fast.acks.end_of_read(fast.unacked):
            fast.ack_now(self._loop.time())
            self.transmit()
        else:
            self.arm_quic_timer_after_receive()

    def receive(self, data: bytes, addr: Any) -> None:
        """Feed one UDP datagram and dispatch what it carried (no transmit)."""
        loop_time = self._loop.time()
        for payload in self.fast.receive_datagram(data, addr, loop_time):
            self.datagram_frame_received(payload)
        self._process_events()

    def _process_events(self) -> None:
        # DATAGRAM frames parsed by aioquic's general path come as events; the relay
        # never uses aioquic's connected/ping waiters. The server's connection-id and
        # termination handlers are kept.
        quic = self._quic
        event = quic.next_event()
        while event is not None:
            if type(event) is events.DatagramFrameReceived:
                self.datagram_frame_received(event.data)
            else:
                if isinstance(event, events.ConnectionIdIssued):
                    self._connection_id_issued_handler(event.connection_id)
                elif isinstance(event, events.ConnectionIdRetired):
                    self._connection_id_retired_handler(event.connection_id)
                elif isinstance(event, events.ConnectionTerminated):
                    self._connection_terminated_handler()
                    self._closed.set()
                self.quic_event_received(event)
            event = quic.next_event()

    def send_stream_data(self, stream_id: int, data: bytes) -> None:
        """Queue bytes on a stream (sent by the next :meth:`transmit`)."""
        self._quic.send_stream_data(stream_id, data)
        self.fast.touch()

    def close_quic(self, code: int, reason: str) -> None:
        """Queue CONNECTION_CLOSE (sent by the next :meth:`transmit`)."""
        self._quic.close(error_code=code, reason_phrase=reason)
        self.fast.touch()

    def transmit(self) -> None:
        """Send what QUIC has to send, then :meth:`arm_quic_timer`.

        aioquic re-arms its timer after every transmit (the loss-detection deadline moves
        with each packet sent): a ``call_at`` and a cancel per transmit. Keeping a
        slightly earlier timer is harmless — ``handle_timer`` checks each deadline
        against now and the transmit after it arms the next one.
        """
        self._transmit_task = None
        transport = self._transport
        if transport is not None:
            out = self.fast.datagrams_to_send(self._loop.time())
            send_many = getattr(transport, "sendto_many", None)
            if len(out) > 1 and send_many is not None and all(a == out[0][1] for _, a in out):
                send_many([data for data, _ in out], out[0][1])
            else:
                sendto = transport.sendto
                for data, addr in out:
                    sendto(data, addr)
        self.arm_quic_timer()

    def arm_quic_timer_after_receive(self) -> None:
        """:meth:`arm_quic_timer` after :meth:`receive`, skipped when only a DATAGRAM
        packet was parsed and the armed timer is not later than the ACK it owes."""
        fast = self.fast
        if not fast.timers_moved and self._timer is not None:
            ack_at = fast.ack_deadline()
            armed = self._timer_at
            if ack_at is None or (armed is not None and armed <= ack_at):
                return
        self.arm_quic_timer()

    def arm_quic_timer(self) -> None:
        """Arm aioquic's timer for its next deadline, unless one is armed at most
        :data:`TIMER_SLACK` earlier (which fires, finds nothing due, and re-arms)."""
        timer_at = self._quic.get_timer()
        if self._timer is not None:
            armed = self._timer_at
            if (
                timer_at is not None
                and armed is not None
                and armed <= timer_at <= armed + TIMER_SLACK
            ):
                return
            self._timer.cancel()
            self._timer = None
        if timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    def _handle_timer(self) -> None:
        self.timer_fires += 1
        now = max(self._timer_at or 0.0, self._loop.time())
        self._timer = None
        self._timer_at = None
        self.fast.handle_timer(now)
        self._process_events()
        self.transmit()


class AdmittingQuicServer(QuicServer):
    """aioquic's server, asking ``admit(source, now)`` before an Initial packet from a new
    source creates a connection (refused ones are dropped silently, costing one header
    parse). While that connection is created, :attr:`admitting_source` is the source;
    ``unused(source)`` is called if an admitted packet created no connection."""

    def __init__(
        self,
        admit: Callable[[str, float], bool],
        unused: Callable[[str], None],
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self._cid_length = self._configuration.connection_id_length
        self._admit = admit
        self._unused = unused
        #: the source being admitted, while ``create_protocol`` runs (else None)
        self.admitting_source: str | None = None
        self._read: set[Any] = set()

    def datagrams_drained(self) -> None:
        """End of a read of the shared socket: tell each connection that received in it."""
        read, self._read = self._read, set()
        for protocol in read:
            drained = getattr(protocol, "datagrams_drained", None)
            if drained is not None:
                drained()

    def take_admitting_source(self) -> str | None:
        """The source being admitted (cleared: the new connection owns it)."""
        source, self.admitting_source = self.admitting_source, None
        return source

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        data = cast(bytes, data)
        if data and not data[0] & 0x80:
            # a short header (1-RTT): only a known connection id can use it, which is
            # all aioquic's server checks for it (without parsing the header twice)
            protocol = self._protocols.get(data[1 : 1 + self._cid_length])
            if protocol is not None:
                self._read.add(protocol)
                protocol.datagram_received(data, addr)
            return
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._configuration.connection_id_length
            )
        except ValueError:
            return
        if (
            header.packet_type == QuicPacketType.INITIAL
            and len(data) >= 1200
            and header.destination_cid not in self._protocols
        ):
            source = str(addr[0])
            if not self._admit(source, self._loop.time()):
                return
            self.admitting_source = source
            try:
                super().datagram_received(data, addr)
            finally:
                if self.admitting_source is not None:  # no connection was made
                    self.admitting_source = None
                    self._unused(source)
            return
        protocol = self._protocols.get(header.destination_cid)
        if protocol is not None:
            self._read.add(protocol)
        super().datagram_received(data, addr)

    def local_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the server's socket is bound to (None before it is)."""
        if self._transport is None:
            return None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return host, port
