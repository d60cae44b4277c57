"""Signaling messages (WebSocket JSON at ``/ws``), validated with msgspec.

Every client message has a ``type``; requests may carry an ``id`` that the reply
echoes. See docs/protocol.md for the full protocol.
"""

from __future__ import annotations

from typing import Annotated, get_args

import msgspec

MAX_MESSAGE_BYTES = 64 * 1024
MAX_SDP_BYTES = 48 * 1024

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# \Z, not $: "$" also matches before a trailing newline.
RoomName = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"\A[\w.\-]+\Z")]
RequestId = (
    Annotated[int, msgspec.Meta(ge=0, le=2**53)] | Annotated[str, msgspec.Meta(max_length=64)]
)
Sdp = Annotated[str, msgspec.Meta(min_length=10, max_length=MAX_SDP_BYTES)]


class Join(msgspec.Struct, tag="join", forbid_unknown_fields=True):
    """Join a room with an access token. Reply: ``joined``."""

    room: RoomName
    token: Annotated[str, msgspec.Meta(max_length=4096)]
    id: RequestId | None = None
    name: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    auto_subscribe: bool = True
    region: Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    """The client's region hint for placement (default: this node's region)."""
    hops: Annotated[int, msgspec.Meta(ge=0, le=8)] = 0
    """Redirects the client already followed; a node redirects only while it is below 2."""
    resumes: Id | None = None
    """The participant id this client had before it moved (``migrate`` or failover): its
    old producers are never offered back to it, and others see it as the same person."""


Mid = Annotated[str, msgspec.Meta(min_length=1, max_length=16)]
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Publish(msgspec.Struct, tag="publish", forbid_unknown_fields=True):
    """SDP offer for the publish peer connection. Reply: ``published`` with the answer."""

    sdp: Sdp
    id: RequestId | None = None
    sources: Annotated[dict[Mid, Source], msgspec.Meta(max_length=32)] | None = None
    """Per m-line (mid), the ``source`` a republished track continues (after a move);
    each must start with the token's identity and ``/``."""


class Answer(msgspec.Struct, tag="answer", forbid_unknown_fields=True):
    """SDP answer to a server ``offer`` on the subscribe peer connection."""

    sdp: Sdp
    id: RequestId | None = None


class Subscribe(msgspec.Struct, tag="subscribe", forbid_unknown_fields=True):
    """Consume a producer. Reply: ``subscribed``; an ``offer`` follows."""

    producer_id: Id
    id: RequestId | None = None
    paused: bool = False


class Unsubscribe(msgspec.Struct, tag="unsubscribe", forbid_unknown_fields=True):
    """Close one of my consumers."""

    consumer_id: Id
    id: RequestId | None = None


class PauseConsumer(msgspec.Struct, tag="pause", forbid_unknown_fields=True):
    """Pause one of my consumers."""

    consumer_id: Id
    id: RequestId | None = None


class ResumeConsumer(msgspec.Struct, tag="resume", forbid_unknown_fields=True):
    """Resume one of my consumers (starts at a keyframe)."""

    consumer_id: Id
    id: RequestId | None = None


class Unpublish(msgspec.Struct, tag="unpublish", forbid_unknown_fields=True):
    """Close one of my producers."""

    producer_id: Id
    id: RequestId | None = None


class GetStats(msgspec.Struct, tag="stats", forbid_unknown_fields=True):
    """Ask for my producers' and consumers' stats. Reply: ``stats``."""

    id: RequestId | None = None


class Leave(msgspec.Struct, tag="leave", forbid_unknown_fields=True):
    """Leave the room; the server closes the socket after ``left``."""

    id: RequestId | None = None


class Ping(msgspec.Struct, tag="ping", forbid_unknown_fields=True):
    """Keepalive. Reply: ``pong``."""

    id: RequestId | None = None


ClientMessage = (
    Join
    | Publish
    | Answer
    | Subscribe
    | Unsubscribe
    | PauseConsumer
    | ResumeConsumer
    | Unpublish
    | GetStats
    | Leave
    | Ping
)

_decoder = msgspec.json.Decoder(ClientMessage)
_encoder = msgspec.json.Encoder()


class ProtocolError(Exception):
    """A message the server refuses, with the error code sent back to the client."""

    def __init__(self, code: str, message: str, request_id: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


KNOWN_TYPES = frozenset(str(cls.__struct_config__.tag) for cls in get_args(ClientMessage))


def decode_client_message(raw: str | bytes) -> ClientMessage:
    """Parse and validate one client message or raise :class:`ProtocolError`."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message is {size} bytes, limit {MAX_MESSAGE_BYTES}")
    try:
        return _decoder.decode(raw)
    except RecursionError:
        raise ProtocolError("bad_message", "JSON nested too deeply") from None
    except msgspec.ValidationError as exc:
        request_id = None
        try:
            loose = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            loose = None
        if isinstance(loose, dict):
            request_id = loose.get("id") if isinstance(loose.get("id"), (int, str)) else None
            kind = loose.get("type")
            if kind is None:
                raise ProtocolError("bad_message", "missing 'type'", request_id) from None
            if not isinstance(kind, str):
                raise ProtocolError("bad_message", "'type' must be a string", request_id) from None
            if kind not in KNOWN_TYPES:
                raise ProtocolError(
                    "unknown_type", f"unknown message type {kind!r}", request_id
                ) from None
        elif loose is not None:
            raise ProtocolError("bad_message", "message must be a JSON object") from None
        raise ProtocolError("bad_message", str(exc), request_id) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("bad_json", f"not valid JSON: {exc}") from None


def encode(message: dict[str, object]) -> str:
    """Serialize a server message."""
    return _encoder.encode(message).decode()


def error_message(code: str, message: str, request_id: object = None) -> dict[str, object]:
    """The ``error`` message sent for a refused request."""
    out: dict[str, object] = {"type": "error", "code": code, "message": message}
    if request_id is not None:
        out["id"] = request_id
    return out
