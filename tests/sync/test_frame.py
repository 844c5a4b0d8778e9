"""The gateway's hand-written Frame codec (edgetwin/sync/frame.py) against the code
protoc generates from sync.proto (the relay's): the same bytes for every frame, the same
frame from every message, and the same bytes refused."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgetwin.sync.frame import Frame
from edgetwin.sync.v1 import sync_pb2
from edgetwin.sync.wire import WireError

U64 = st.integers(0, (1 << 64) - 1)
frames = st.builds(
    Frame,
    seq=U64 | st.integers(0, 1000),
    ack=U64 | st.integers(0, 1000),
    encoding=st.integers(-(1 << 31), (1 << 31) - 1) | st.sampled_from([0, 1, 2, 3]),
    payload=st.binary(max_size=300),
    echo=st.booleans(),
)


def fields(msg: sync_pb2.Frame | Frame) -> tuple[int, int, int, bytes, bool]:
    return (msg.seq, msg.ack, int(msg.encoding), bytes(msg.payload), bool(msg.echo))


@given(frames)
@settings(max_examples=500)
def test_every_frame_encodes_as_protobuf_encodes_it_and_decodes_back(frame: Frame) -> None:
    theirs = sync_pb2.Frame(
        seq=frame.seq, ack=frame.ack, encoding=frame.encoding, payload=frame.payload, echo=frame.echo
    )
    assert frame.encode() == theirs.SerializeToString()
    assert fields(Frame.decode(theirs.SerializeToString())) == fields(theirs)


@given(st.binary(max_size=64) | st.builds(lambda f, tail: f.encode() + tail, frames, st.binary(max_size=12)))
@settings(max_examples=3000)
@example(b"\x08" + b"\xff" * 9 + b"\x7f")  # a varint with bits beyond 64
@example(b"\x08" + b"\xff" * 10 + b"\x01")  # longer than 10 bytes
@example(b"\x0b\x0c")  # a group
@example(b"\x0b" * 100 + b"\x0c" * 100)  # groups as deep as protobuf allows
@example(b"\x0b" * 101 + b"\x0c" * 101)  # one deeper
@example(b"\xf8\xff\xff\xff\x7f\x01")  # a field number beyond protobuf's range
@example(b"\x22\x05ab")  # bytes past the end
@example(b"\x12\x01x\x08\x07")  # a known number with another wire type, then seq
def test_any_bytes_decode_as_protobuf_decodes_them_or_are_refused_as_it_refuses_them(data: bytes) -> None:
    try:
        theirs = sync_pb2.Frame.FromString(data)
    except DecodeError:
        with pytest.raises(WireError):
            Frame.decode(data)
        return
    assert fields(Frame.decode(data)) == fields(theirs)
