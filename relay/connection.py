"""Sans-I/O state machine of one relay connection, whatever carries it.

A :class:`RelayConnection` takes events in — control-stream bytes, flow datagrams, the
end of the TLS handshake, the loss of the transport, ``poll(now)`` at its
:meth:`~RelayConnection.deadline` — and leaves its output in :attr:`control_out`
(encoded control frames), :attr:`datagrams_out` (flow datagrams) and :attr:`close_out`
(close the transport with this application error). It never reads a clock or touches a
socket; a transport adapter beneath it (QUIC in :mod:`relay.endpoint`, plain datagrams in
:mod:`relay.pipe`) moves the bytes and calls :meth:`poll` when due.

It owns framing of the control stream, heartbeats, dead-peer detection and RTT, the
authentication handshake (:mod:`relay.handshake`, absent on a pipe between trusted
processes), and dispatches to the two flow roles: :class:`~relay.origin.OriginFlows`
(this end serves producers) and :class:`~relay.remote.RemoteFlows` (this end pulls).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .admission import PendingAdmission
from .config import RelayConfig, RelayCounters
from .handshake import ClientHandshake, HandshakeRefused, ServerHandshake
from .origin import ORIGIN_MESSAGES, OriginFlows
from .protocol import (
    ControlDecoder,
    ControlMessage,
    ErrorCode,
    ErrorMsg,
    Heartbeat,
    HeartbeatAck,
    ProtocolError,
    RoomState,
    encode_message,
)
from .remote import REMOTE_MESSAGES, RemoteFlows

__all__ = ["RelayConnection"]

log = logging.getLogger(__name__)


def _ignore() -> None:
    pass


class RelayConnection:
    """One relay connection's protocol state (see the module docstring).

    ``handshake`` is a :class:`ClientHandshake` (dialler), a :class:`ServerHandshake`
    (listener) or None (a pipe: trusted from the start). ``origin`` serves producers on
    this connection; ``remote`` is attached once authenticated so it can pull.
    ``admission``/``source`` (listener only) are settled when the connection
    authenticates or dies. ``max_payload`` caps one flow datagram.
    """

    def __init__(
        self,
        config: RelayConfig,
        counters: RelayCounters,
        now: float,
        *,
        handshake: ClientHandshake | ServerHandshake | None = None,
        origin: OriginFlows | None = None,
        remote: RemoteFlows | None = None,
        admission: PendingAdmission | None = None,
        source: str | None = None,
        max_payload: int | None = None,
    ) -> None:
        self.config = config
        self.counters = counters
        self.handshake = handshake
        self.origin = origin
        self.remote = remote
        self.admission = admission
        self.source = source
        self.max_payload = max_payload if max_payload is not None else config.max_datagram_size - 64
        self.decoder = ControlDecoder()
        #: encoded control frames waiting for the transport
        self.control_out: list[bytes] = []
        #: flow datagrams waiting for the transport
        self.datagrams_out: list[bytes] = []
        #: set once: the transport must close with ``(code, reason)``
        self.close_out: tuple[int, str] | None = None
        #: datagrams the transport still holds (QUIC congestion backlog), for the queue cap
        self.backlog = 0
        #: called when output was queued outside an input event (e.g. by a producer)
        self.notify: Callable[[], None] = _ignore
        #: called once authenticated, and once dead with ``(code, reason)``
        self.on_up: Callable[[RelayConnection], None] = lambda conn: None
        self.on_down: Callable[[RelayConnection, int, str], None] = lambda conn, c, r: None
        #: called with each ROOM_STATE an authenticated peer sends (either role)
        self.on_room_state: Callable[[RelayConnection, RoomState], None] = lambda conn, m: None
        self.authed = False
        self.dead = False
        self.handshake_done = False
        self.peer_key: bytes | None = (
            handshake.peer_key if isinstance(handshake, ClientHandshake) else None
        )
        self.close_code: int | None = None
        self.close_reason = ""
        self.rtt: float | None = None
        self.started = now
        self.last_rx = now
        self._hb_seq = 0
        self._tick_at = now + config.heartbeat_interval
        if handshake is None:
            self._authenticated(now)

    # -- output -----------------------------------------------------------------------

    def send_msg(self, msg: ControlMessage) -> None:
        """Queue one control message (no-op once dead)."""
        if self.dead:
            return
        self.control_out.append(encode_message(msg))
        self.notify()

    def send_datagram(self, data: bytes) -> bool:
        """Queue one flow datagram; False (counted) if too large or the queue is full."""
        if len(data) > self.max_payload:
            self.counters.datagrams_too_large += 1
            return False
        out = self.datagrams_out
        if len(out) + self.backlog >= self.config.max_pending_datagrams or self.dead:
            self.counters.datagrams_queue_full += 1
            return False
        out.append(data)
        self.notify()
        return True

    def take_control(self) -> bytes:
        """All queued control bytes, as one string for a stream (and clear them)."""
        out, self.control_out = self.control_out, []
        return b"".join(out)

    # -- input --------------------------------------------------------------------------

    def handshake_completed(self, alpn: str | None, cert_key: bytes | None, now: float) -> None:
        """The transport's TLS handshake finished (QUIC); the dialler starts authenticating."""
        self.handshake_done = True
        hs = self.handshake
        if isinstance(hs, ClientHandshake) and not self.dead:
            try:
                self.send_msg(hs.tls_done(alpn, cert_key, now))
            except HandshakeRefused as exc:
                self._refused(exc)

    def receive_control(self, data: bytes, end_stream: bool, now: float) -> None:
        """Bytes of the control stream (in order)."""
        if self.dead:
            return
        try:
            msgs = self.decoder.feed(data)
        except ProtocolError as exc:
            self.counters.control_fatal += 1
            self.abort(exc.code, str(exc))
            return
        finally:
            self.counters.control_malformed += self.decoder.malformed
            self.decoder.malformed = 0
        if end_stream:
            self.abort(ErrorCode.PROTOCOL_VIOLATION, "control stream closed")
            return
        if msgs:
            self.last_rx = now
        for msg in msgs:
            if self.dead:
                return
            try:
                self._dispatch(msg, now)
            except Exception:
                log.exception("relay: error handling %s", type(msg).__name__)
                self.counters.control_malformed += 1

    def receive_datagram(self, data: bytes, now: float) -> None:
        """One flow datagram from the peer (hot path on the pulling side)."""
        remote = self.remote
        if remote is not None and self.authed:
            remote.receive_datagram(data, now)
        else:
            self.counters.datagrams_unexpected += 1

    def connection_lost(self, code: int, reason: str) -> None:
        """The transport is gone (closed by the peer, idle timeout, socket error)."""
        self._terminate(code, reason)

    def abort(self, code: int, reason: str) -> None:
        """Close with an application error (:attr:`close_out`) and tear down at once."""
        if self.dead:
            return
        # Strangers that never authenticated are counted, not logged one by one.
        level = logging.INFO if self.authed or self.peer_key else logging.DEBUG
        name = self.peer_key.hex()[:16] if self.peer_key else "?"
        log.log(level, "relay: closing connection to %s: %s (%d)", name, reason, code)
        self.close_out = (code, reason)
        self._terminate(code, reason)

    # -- timers -------------------------------------------------------------------------

    def deadline(self) -> float | None:
        """When :meth:`poll` must run next (None once dead)."""
        return None if self.dead else self._tick_at

    def poll(self, now: float) -> None:
        """Heartbeat, dead-peer and authentication deadlines."""
        if self.dead or now < self._tick_at:
            return
        self._tick_at = now + self.config.heartbeat_interval
        if not self.authed:
            expired = self._pending_expired(now)
            if expired is not None:
                self.abort(ErrorCode.TIMEOUT, f"{expired} timed out")
        elif now - self.last_rx > self.config.dead_after:
            self.counters.heartbeat_timeouts += 1
            self.abort(ErrorCode.HEARTBEAT_TIMEOUT, "no heartbeat from peer")
        else:
            self._hb_seq += 1
            self.send_msg(Heartbeat(self._hb_seq, now))

    # -- internals ----------------------------------------------------------------------

    def _pending_expired(self, now: float) -> str | None:
        if self.admission is not None:
            return self.admission.expired(self.started, self.handshake_done, now)
        limit = self.config.admission.auth_timeout
        return "authentication" if now - self.started > limit else None

    def _dispatch(self, msg: ControlMessage, now: float) -> None:
        if isinstance(msg, Heartbeat):
            self.send_msg(HeartbeatAck(msg.seq, msg.sent_at))
        elif isinstance(msg, HeartbeatAck):
            self._rtt_sample(now - msg.sent_at)
        elif isinstance(msg, ErrorMsg) and msg.request_id == 0 and self.handshake is None:
            # a pipe's goodbye (QUIC closes with CONNECTION_CLOSE instead)
            self._terminate(msg.code, msg.reason)
        elif not self.authed:
            self._handshake_step(msg, now)
        elif isinstance(msg, RoomState):
            self.counters.room_states_received += 1
            self.on_room_state(self, msg)
        elif isinstance(msg, ORIGIN_MESSAGES):
            if self.origin is None:
                self.counters.control_unexpected += 1
            else:
                self.origin.on_message(msg, now)
        elif isinstance(msg, REMOTE_MESSAGES):
            if self.remote is None:
                self.counters.control_unexpected += 1
            else:
                self.remote.on_message(msg, now)
        else:
            self.counters.control_unexpected += 1

    def _handshake_step(self, msg: ControlMessage, now: float) -> None:
        hs = self.handshake
        try:
            if isinstance(hs, ServerHandshake):
                reply = hs.on_message(msg)
                self.peer_key = hs.peer_key
                self.send_msg(reply)
                if hs.done:
                    self._authenticated(now)
            elif isinstance(hs, ClientHandshake):
                answer = hs.on_message(msg)
                if answer is not None:
                    if hs.hello_at is not None:
                        self._rtt_sample(now - hs.hello_at)
                    self.send_msg(answer)
                if hs.done:
                    self._authenticated(now)
        except HandshakeRefused as exc:
            self._refused(exc)

    def _refused(self, exc: HandshakeRefused) -> None:
        if exc.refused:
            self.counters.auth_refused += 1
            if exc.code == ErrorCode.UNAUTHORIZED and self.admission is not None:
                self.admission.counters.refused_unauthorized += 1
        self.abort(exc.code, exc.reason)

    def _authenticated(self, now: float) -> None:
        self.authed = True
        self.last_rx = now
        self._settle()
        if self.origin is not None:
            self.origin.peer_key = self.peer_key
        if self.remote is not None:
            self.remote.attach(self, now)
            if self.rtt is not None:
                self.remote.set_rtt(self.rtt)
        self.on_up(self)

    def _rtt_sample(self, sample: float) -> None:
        if sample < 0 or sample > 60:
            return
        self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample
        if self.remote is not None and self.authed:
            self.remote.set_rtt(self.rtt)

    def _settle(self) -> None:
        if self.source is not None and self.admission is not None:
            self.admission.settle(self.source)
        self.source = None

    def _terminate(self, code: int, reason: str) -> None:
        if self.dead:
            return
        was_authed = self.authed
        self.dead = True
        self.authed = False
        self.close_code = code
        self.close_reason = reason
        self.counters.connections_closed += 1
        self._settle()
        self.datagrams_out.clear()
        try:
            if self.origin is not None:
                self.origin.close()
            if self.remote is not None and was_authed and self.remote.conn is self:
                self.remote.detach(reason)
        except Exception:
            log.exception("relay: cleanup failed")
        try:
            self.on_down(self, code, reason)
        except Exception:
            log.exception("relay: cleanup failed")
        self.notify()

    def __repr__(self) -> str:
        name = self.peer_key.hex()[:16] if self.peer_key else "?"
        state = "dead" if self.dead else "live" if self.authed else "pending"
        return f"<RelayConnection {name} {state}>"
