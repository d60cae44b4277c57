"""Sans-I/O wire format of the relay protocol (see docs/relay-protocol.md).

Two channels share one QUIC connection:

* the **control stream** (the first client-initiated bidirectional stream) carries
  length-prefixed, versioned msgpack messages (:func:`encode_message`, :class:`ControlDecoder`);
* **QUIC DATAGRAM frames** (RFC 9221) carry RTP packets (and the producer's RTCP
  sender reports), each prefixed with a 4-byte big-endian flow tag
  (:func:`datagram_prefix`, :func:`parse_datagram`).

Nothing in here performs I/O or reads a clock.
"""

from __future__ import annotations

import enum
import struct
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "ALPN",
    "DATAGRAM_HEADER_SIZE",
    "FRAME_HEADER_SIZE",
    "MAX_CONTROL_MESSAGE",
    "MAX_NACK_SEQS",
    "PROTOCOL_VERSION",
    "RTCP_FLAG",
    "Auth",
    "AuthOk",
    "ControlDecoder",
    "ControlMessage",
    "ErrorCode",
    "ErrorMsg",
    "Heartbeat",
    "HeartbeatAck",
    "Hello",
    "KeyframeRequest",
    "MalformedDatagram",
    "MalformedMessage",
    "MessageTooLarge",
    "Nack",
    "ProducerClosed",
    "ProtocolError",
    "RoomMember",
    "RoomProducer",
    "RoomState",
    "Stats",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
    "UnsupportedVersion",
    "datagram_prefix",
    "encode_message",
    "parse_datagram",
    "rtp_seq",
]

PROTOCOL_VERSION = 1
ALPN = "cascade-relay/1"
#: Largest control message body accepted (bytes, after the frame header).
MAX_CONTROL_MESSAGE = 64 * 1024
#: Most sequence numbers in one NACK message.
MAX_NACK_SEQS = 512
#: Most producers and most members listed in one ROOM_STATE message.
MAX_ROOM_ITEMS = 256
_FRAME = struct.Struct("!BI")  # version (u8), body length (u32)
FRAME_HEADER_SIZE = _FRAME.size
DATAGRAM_HEADER_SIZE = 4
#: Top bit of the DATAGRAM flow tag: the payload is RTCP, not RTP.
RTCP_FLAG = 0x80000000
#: Flow ids are allocated below this (the top bit is the RTCP flag).
MAX_FLOW_ID = RTCP_FLAG - 1
_RTP_MIN = 12
_RTCP_MIN = 8


class ErrorCode(enum.IntEnum):
    """Application error codes: QUIC CONNECTION_CLOSE codes and ``ErrorMsg.code``."""

    NO_ERROR = 0
    PROTOCOL_VIOLATION = 1
    UNSUPPORTED_VERSION = 2
    MESSAGE_TOO_LARGE = 3
    UNAUTHORIZED = 4
    AUTH_FAILED = 5
    WRONG_PEER = 6
    HEARTBEAT_TIMEOUT = 7
    SHUTDOWN = 8
    TIMEOUT = 9
    NOT_FOUND = 16
    CODEC_UNAVAILABLE = 17
    TOO_MANY_FLOWS = 18


class ProtocolError(Exception):
    """Base class of every decoding error raised by this module."""

    code: ErrorCode = ErrorCode.PROTOCOL_VIOLATION


class MessageTooLarge(ProtocolError):
    """A control frame announced a body larger than :data:`MAX_CONTROL_MESSAGE`."""

    code = ErrorCode.MESSAGE_TOO_LARGE


class UnsupportedVersion(ProtocolError):
    """A control frame carried a protocol version this node does not speak."""

    code = ErrorCode.UNSUPPORTED_VERSION


class MalformedMessage(ProtocolError):
    """A control frame body was not a valid message (framing is still in sync)."""


class MalformedDatagram(ProtocolError):
    """A DATAGRAM frame was too short or did not carry an RTP packet."""


_Key = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
_Sig = Annotated[bytes, msgspec.Meta(max_length=64)]
_U32 = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
_Seq = Annotated[int, msgspec.Meta(ge=0, lt=65536)]
_Text = Annotated[str, msgspec.Meta(max_length=1024)]


class _Msg(msgspec.Struct, array_like=True, tag_field="t", forbid_unknown_fields=False):
    pass


class Hello(_Msg, tag=1):
    """Auth step 1/2 (both directions): version, node public key, fresh nonce, signature.

    The client's Hello has an empty signature; the server's Hello signs the transcript.
    """

    version: int
    public_key: _Key
    nonce: _Key
    signature: _Sig = b""


class Auth(_Msg, tag=2):
    """Auth step 3 (client to server): the client's signature over the transcript."""

    signature: _Sig


class AuthOk(_Msg, tag=3):
    """Auth step 4 (server to client): the client is authenticated; media may flow."""


class Subscribe(_Msg, tag=10):
    """Ask the origin to open (or share) the flow of ``producer_id``."""

    request_id: _U32
    producer_id: _Text


class Subscribed(_Msg, tag=11):
    """Successful answer to :class:`Subscribe`."""

    request_id: _U32
    flow_id: _U32
    producer_id: _Text
    kind: _Text
    codec: dict[str, Any]


class ErrorMsg(_Msg, tag=12):
    """Failed answer to a request (``request_id`` 0 when not tied to a request)."""

    request_id: _U32
    code: int
    reason: _Text


class Unsubscribe(_Msg, tag=13):
    """The remote node no longer needs the flow."""

    flow_id: _U32


class KeyframeRequest(_Msg, tag=14):
    """Ask the origin producer for a keyframe (rate-limited at both ends)."""

    flow_id: _U32


class Nack(_Msg, tag=15):
    """Ask the origin to retransmit RTP packets of a flow by sequence number."""

    flow_id: _U32
    seqs: Annotated[list[_Seq], msgspec.Meta(max_length=MAX_NACK_SEQS)]


class ProducerClosed(_Msg, tag=16):
    """The origin producer of the flow closed; the flow id is dead. ``lost``: it did not
    end but was lost on the origin's side (it came from a process or node that went away),
    so a republished track may follow."""

    flow_id: _U32
    lost: bool = False


class Heartbeat(_Msg, tag=20):
    """Liveness probe; the peer answers with :class:`HeartbeatAck` echoing ``sent_at``."""

    seq: _U32
    sent_at: float


class HeartbeatAck(_Msg, tag=21):
    """Answer to :class:`Heartbeat` (gives the sender an RTT sample)."""

    seq: _U32
    sent_at: float


class Stats(_Msg, tag=22):
    """Receive-side counters of one flow, reported by the remote node to the origin."""

    flow_id: _U32
    packets: int
    bytes: int
    lost: int
    repaired: int


class RoomProducer(msgspec.Struct, array_like=True, frozen=True):
    """A producer published on the sending node (in :class:`RoomState`)."""

    id: Annotated[str, msgspec.Meta(max_length=64)]
    kind: Literal["audio", "video"]


class RoomMember(msgspec.Struct, array_like=True, frozen=True):
    """A participant on the sending node (in :class:`RoomState`)."""

    id: Annotated[str, msgspec.Meta(max_length=64)]
    name: Annotated[str, msgspec.Meta(max_length=64)] = ""


class RoomState(_Msg, tag=30):
    """The sending node's share of a room, complete (not a delta): its participant count,
    the producers published on it and its members. Sent in either direction on a live
    link, at once on every change, to the nodes sharing the room (the directory stays the
    fallback), and before a SUBSCRIBE to the room's producers. ``participants`` 0: the room
    closed on the sender."""

    room: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    participants: _U32
    producers: Annotated[list[RoomProducer], msgspec.Meta(max_length=MAX_ROOM_ITEMS)] = []
    members: Annotated[list[RoomMember], msgspec.Meta(max_length=MAX_ROOM_ITEMS)] = []


ControlMessage = (
    Hello
    | Auth
    | AuthOk
    | Subscribe
    | Subscribed
    | ErrorMsg
    | Unsubscribe
    | KeyframeRequest
    | Nack
    | ProducerClosed
    | Heartbeat
    | HeartbeatAck
    | Stats
    | RoomState
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[ControlMessage] = msgspec.msgpack.Decoder(ControlMessage)


def encode_message(msg: ControlMessage) -> bytes:
    """Encode one control message with its frame header (version + length)."""
    body = _encoder.encode(msg)
    if len(body) > MAX_CONTROL_MESSAGE:
        raise MessageTooLarge(f"control message of {len(body)} bytes exceeds cap")
    return _FRAME.pack(PROTOCOL_VERSION, len(body)) + body


def decode_body(body: bytes) -> ControlMessage:
    """Decode one control message body (no frame header); raises :class:`MalformedMessage`."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(str(exc)) from None


class ControlDecoder:
    """Incremental decoder of the control stream.

    :meth:`feed` returns the complete messages in the bytes received so far.  A body that
    does not decode is skipped and counted in :attr:`malformed` (framing stays in sync);
    an oversized or wrongly versioned frame raises (the stream cannot be resynchronised,
    the caller should close the connection with ``exc.code``).
    """

    __slots__ = ("_buf", "malformed", "max_size", "messages")

    def __init__(self, max_size: int = MAX_CONTROL_MESSAGE) -> None:
        self._buf = bytearray()
        self.max_size = max_size
        self.messages = 0
        self.malformed = 0

    def feed(self, data: bytes) -> list[ControlMessage]:
        """Add stream bytes; return the messages now complete (possibly none)."""
        buf = self._buf
        buf += data
        out: list[ControlMessage] = []
        pos = 0
        end = len(buf)
        while end - pos >= FRAME_HEADER_SIZE:
            version, length = _FRAME.unpack_from(buf, pos)
            if version != PROTOCOL_VERSION:
                raise UnsupportedVersion(f"control frame version {version}")
            if length > self.max_size:
                raise MessageTooLarge(f"control frame of {length} bytes (cap {self.max_size})")
            start = pos + FRAME_HEADER_SIZE
            if end - start < length:
                break
            body = bytes(buf[start : start + length])
            pos = start + length
            try:
                out.append(decode_body(body))
                self.messages += 1
            except MalformedMessage:
                self.malformed += 1
        if pos:
            del buf[:pos]
        return out


def datagram_prefix(flow_id: int, rtcp: bool = False) -> bytes:
    """The 4-byte DATAGRAM prefix for ``flow_id`` (build once per flow, reuse per packet).

    With ``rtcp`` the top bit (:data:`RTCP_FLAG`) is set: the payload is an RTCP packet
    of the flow (e.g. the producer's sender reports) rather than RTP.
    """
    return (flow_id | RTCP_FLAG if rtcp else flow_id).to_bytes(4, "big")


def parse_datagram(data: bytes) -> tuple[int, bool, bytes]:
    """Split a DATAGRAM payload into ``(flow_id, is_rtcp, packet)``.

    Raises :class:`MalformedDatagram` if it is too short or not RTP/RTCP version 2.
    """
    if len(data) < DATAGRAM_HEADER_SIZE + _RTCP_MIN or (data[4] & 0xC0) != 0x80:
        raise MalformedDatagram("datagram is not a flow-tagged RTP/RTCP packet")
    tag = int.from_bytes(data[:4], "big")
    if tag & RTCP_FLAG:
        return tag ^ RTCP_FLAG, True, data[4:]
    if len(data) < DATAGRAM_HEADER_SIZE + _RTP_MIN:
        raise MalformedDatagram("RTP packet shorter than its fixed header")
    return tag, False, data[4:]


def rtp_seq(packet: bytes) -> int:
    """RTP sequence number of ``packet`` (caller guarantees at least 4 bytes)."""
    return (packet[2] << 8) | packet[3]
