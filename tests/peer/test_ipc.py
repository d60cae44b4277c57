"""Supervisor <-> worker frames: the sans-I/O reader, byte by byte and hostile."""

from __future__ import annotations

import socket

import pytest

from peer.ipc import (
    ClientData,
    FrameError,
    FrameReader,
    Load,
    Member,
    ProducerInfo,
    RoomState,
    encode_frame,
    pipe_channel,
    receive_pipe,
    send_pipe,
)

FRAMES = [
    ClientData(7, b'{"type":"ping","id":1}'),
    RoomState("r", [Member("pa-1", None), Member("pa-2", "bob")], [ProducerInfo("pr-1", "video")]),
    Load(consumers=3, producers=1, egress_pps=150.5, totals={"consumers": 3.0}),
]


def test_frames_survive_any_split() -> None:
    data = b"".join(encode_frame(f) for f in FRAMES)
    for chunk in (1, 3, 7, len(data)):
        reader = FrameReader()
        got = []
        for i in range(0, len(data), chunk):
            got += reader.feed(data[i : i + chunk])
        assert got == FRAMES


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x03abc",  # not msgpack of a frame
        b"\x00\x00\x00\x01\xc0",  # nil
        b"\x00\x00\x00\x04\x81\xa1x\x01",  # a map without a known tag
    ],
)
def test_garbage_is_a_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        FrameReader().feed(data)


def test_oversized_frame_refused_before_buffering() -> None:
    with pytest.raises(FrameError, match="limit"):
        FrameReader(max_frame=1024).feed(b"\x00\x10\x00\x00")


def test_pipe_socket_handed_over() -> None:
    ours, theirs = pipe_channel()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs, a, b:
        send_pipe(ours, 3, a)
        handed = receive_pipe(theirs)
        assert handed is not None
        peer, sock = handed
        with sock:
            assert peer == 3
            sock.send(b"hello")
            assert b.recv(16) == b"hello"
        ours.close()
        assert receive_pipe(theirs) is None
