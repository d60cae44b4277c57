"""Frames between a node's supervisor and its media workers (msgpack over a Unix stream socket).

Each frame is a 4-byte big-endian length and one msgspec-encoded :data:`Frame`. The
:class:`FrameReader` is sans-I/O (bytes in, frames out); :class:`Channel` is the thin asyncio
adapter. A participant's WebSocket stays on the supervisor: its messages are forwarded to the
worker that holds its transports as :class:`ClientData`, and what the worker sends back comes as
:class:`ToClient` (see docs/architecture.md, "Worker processes", for why not SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import socket
import struct

import msgspec

MAX_FRAME_BYTES = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")
_PIPE_PEER = struct.Struct(">I")


class Hello(msgspec.Struct, tag="hello"):
    """Worker -> supervisor, first frame: who connected."""

    worker_id: int
    pid: int


class WorkerSetup(msgspec.Struct, tag="setup"):
    """Supervisor -> worker, answer to :class:`Hello`: what the worker's node needs."""

    api_secret: str
    token_public_key: bytes
    ice_addresses: list[str]
    ice_announce: str | None
    max_consumers: int
    max_cpu: float
    max_egress_pps: float
    keyframe_request_delay: float
    answer_timeout: float
    # This worker's shared ICE port (the node's --ice-port plus the worker's index).
    ice_port: int | None = None


#: The supervisor as a sibling of a room's workers (in :class:`SiblingRoom` and as the
#: peer of a pipe): it stands for the room's participants and producers on other nodes.
SUPERVISOR_ID = 0xFFFF


class Member(msgspec.Struct, array_like=True):
    """A participant as the other workers of its room see it."""

    participant_id: str
    name: str | None
    auto: bool = True
    """Subscribes to every producer of the room as it appears."""
    moving: bool = False
    """Told to move to another node (drain)."""
    region: str | None = None
    """The region the participant said it is in (placement of a drain's move)."""


class ProducerInfo(msgspec.Struct, array_like=True):
    """A producer published on a worker (never a piped one)."""

    producer_id: str
    kind: str
    participant_id: str = ""


class RoomState(msgspec.Struct, tag="room"):
    """Worker -> supervisor: this worker's members and local producers of ``room`` (empty
    lists: the worker left the room)."""

    room: str
    members: list[Member]
    producers: list[ProducerInfo]


class SiblingRoom(msgspec.Struct, tag="sibling_room"):
    """Supervisor -> worker: another worker's :class:`RoomState` of a room both host (its
    producers are pulled through the pipe to that worker)."""

    room: str
    worker_id: int
    members: list[Member]
    producers: list[ProducerInfo]
    lost: bool = False
    """The worker died: its producers were lost, not ended (a republished track follows
    when their publishers rejoin)."""


class Open(msgspec.Struct, tag="open"):
    """Supervisor -> worker: a participant's connection is bound to this worker."""

    conn: int


class ClientData(msgspec.Struct, tag="client"):
    """Supervisor -> worker: one validated client message (JSON text) of ``conn``."""

    conn: int
    data: bytes


class Hangup(msgspec.Struct, tag="hangup"):
    """Supervisor -> worker: ``conn``'s socket closed; close its session."""

    conn: int


class ToClient(msgspec.Struct, tag="send"):
    """Worker -> supervisor: one server message (JSON text) for ``conn``."""

    conn: int
    data: bytes


class SessionEnded(msgspec.Struct, tag="ended"):
    """Worker -> supervisor: ``conn``'s session closed (left, or its transport failed)."""

    conn: int


class Load(msgspec.Struct, tag="load"):
    """Worker -> supervisor: counters of the worker's engine (sent once a second while the
    worker hosts a room, and once when it becomes idle)."""

    consumers: int
    producers: int
    egress_pps: float
    totals: dict[str, float]


class Migrate(msgspec.Struct, tag="migrate"):
    """Supervisor -> worker: tell ``conn``'s participant to move to another node (drain);
    ``target`` has its ``url``, ``node_id`` and ``region``."""

    conn: int
    target: dict[str, str]


class StatsRequest(msgspec.Struct, tag="stats_request"):
    """Supervisor -> worker: send your node stats."""

    request: int


class StatsReply(msgspec.Struct, tag="stats_reply"):
    """Worker -> supervisor: the worker's ``NodeServer.stats()`` as JSON."""

    request: int
    data: bytes


Frame = (
    Hello
    | WorkerSetup
    | RoomState
    | SiblingRoom
    | Open
    | ClientData
    | Hangup
    | Migrate
    | ToClient
    | SessionEnded
    | Load
    | StatsRequest
    | StatsReply
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


class FrameError(Exception):
    """The peer sent something that is not a frame; the channel is unusable."""


def encode_frame(frame: Frame) -> bytes:
    """Length prefix plus the encoded frame."""
    body = _encoder.encode(frame)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Sans-I/O frame parser: feed bytes, get complete frames."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by ``data`` (raises :class:`FrameError` on garbage)."""
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= 4:
            (size,) = _LENGTH.unpack_from(self._buffer)
            if size > self._max:
                raise FrameError(f"frame of {size} bytes over the {self._max}-byte limit")
            if len(self._buffer) < 4 + size:
                break
            body = bytes(self._buffer[4 : 4 + size])
            del self._buffer[: 4 + size]
            try:
                frames.append(_decoder.decode(body))
            except msgspec.DecodeError as exc:
                raise FrameError(f"bad frame: {exc}") from None
        return frames


class Channel:
    """A framed Unix-socket stream (asyncio edge of :class:`FrameReader`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = FrameReader()
        self._ready: list[Frame] = []

    def send(self, frame: Frame) -> None:
        """Queue one frame (written in order; never blocks)."""
        if not self._writer.is_closing():
            self._writer.write(encode_frame(frame))

    async def receive(self) -> Frame | None:
        """The next frame, or None once the peer closed."""
        while not self._ready:
            data = await self._reader.read(65536)
            if not data:
                return None
            self._ready.extend(self._frames.feed(data))
        return self._ready.pop(0)

    def close(self) -> None:
        """Close the socket."""
        self._writer.close()


def pipe_channel() -> tuple[socket.socket, socket.socket]:
    """The supervisor's and a worker's ends of the channel that hands the worker its pipe
    sockets (Unix SOCK_SEQPACKET: one message, one socket, never merged)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_pipe(channel: socket.socket, peer: int, pipe: socket.socket) -> None:
    """Hand ``pipe`` (one end of a pipe to worker ``peer``) over ``channel`` (SCM_RIGHTS)."""
    socket.send_fds(channel, [_PIPE_PEER.pack(peer)], [pipe.fileno()])


def receive_pipe(channel: socket.socket) -> tuple[int, socket.socket] | None:
    """The next pipe socket handed over ``channel`` and its peer worker; None once the
    supervisor closed the channel. Raises :class:`FrameError` on a malformed message."""
    data, fds, _flags, _addr = socket.recv_fds(channel, 16, 1)
    if not data and not fds:
        return None
    if len(data) != _PIPE_PEER.size or len(fds) != 1:
        for fd in fds:
            socket.close(fd)
        raise FrameError("malformed pipe hand-over")
    (peer,) = _PIPE_PEER.unpack(data)
    return peer, socket.socket(fileno=fds[0])


__all__ = [
    "SUPERVISOR_ID",
    "Channel",
    "ClientData",
    "Frame",
    "FrameError",
    "FrameReader",
    "Hangup",
    "Hello",
    "Load",
    "Member",
    "Migrate",
    "Open",
    "ProducerInfo",
    "RoomState",
    "SessionEnded",
    "SiblingRoom",
    "StatsReply",
    "StatsRequest",
    "ToClient",
    "WorkerSetup",
    "encode_frame",
    "pipe_channel",
    "receive_pipe",
    "send_pipe",
]
