"""The sync wire format: batches round-trip, bad frames are refused with a reason, and
sequence numbers with cumulative acks deliver every frame exactly once in order across
reconnects (checked with hypothesis); the generated gRPC code is not stale."""

from __future__ import annotations

import contextlib
import filecmp
import re
import subprocess
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgetwin.sync.wire import (
    ACK_DELAY_S,
    ACK_EVERY,
    CLOUD_TO_EDGE,
    ENCODING_MSGPACK,
    ENCODING_MSGPACK_ZLIB,
    ENCODING_MSGPACK_ZSTREAM,
    MAX_BATCH_BYTES,
    MAX_FRAME_BYTES,
    AckTimer,
    FrameDecoder,
    FrameEncoder,
    Incoming,
    Outgoing,
    WireError,
    decode_batch,
    decode_revs,
    encode_batch,
    encode_revs,
    pack_batch,
    unpack_batch,
)

ROOT = Path(__file__).resolve().parents[2]


def status(dev: str, rev: int, temp: float) -> dict[str, Any]:
    return {
        "t": "status",
        "dev": dev,
        "rev": rev,
        "patch": {
            "twins": {"temperature": {"reported": {"value": str(temp), "metadata": {"version": str(rev)}}}}
        },
    }


def test_batches_round_trip_and_compress() -> None:
    batch = [{"t": "hello", "proto": 1, "resume": {"Device": "12"}}] + [
        status(f"plant.d{i}", i, 20.5) for i in range(200)
    ]
    enc, payload = encode_batch(batch)
    assert enc == ENCODING_MSGPACK_ZLIB
    assert decode_batch(enc, payload) == batch
    plain_enc, plain = encode_batch(batch, compress=False)
    assert decode_batch(plain_enc, plain) == batch
    assert len(payload) * 5 < len(plain)  # repetitive status compresses well


@pytest.mark.parametrize(
    ("encoding", "payload", "message"),
    [
        (ENCODING_MSGPACK_ZLIB, b"not zlib", "not valid deflate"),
        (ENCODING_MSGPACK_ZLIB, zlib.compress(msgpack.packb([{"t": "hello"}]))[:-4], "truncated"),
        (ENCODING_MSGPACK, b"\xc1", "not a msgpack batch"),
        (ENCODING_MSGPACK, msgpack.packb({"t": "hello"}), "an array of messages"),
        (ENCODING_MSGPACK, msgpack.packb([{"t": "launch"}]), "unknown type 'launch'"),
        (
            ENCODING_MSGPACK,
            msgpack.packb([{"t": "status", "dev": "a.b", "rev": "7", "patch": {}}]),
            "rev must be int",
        ),
        (ENCODING_MSGPACK, msgpack.packb([5]), "a map, not int"),
        (7, b"", "unknown payload encoding 7"),
        (ENCODING_MSGPACK_ZLIB, zlib.compress(b"\x00" * (MAX_BATCH_BYTES + 10)), "exceeds"),
    ],
)
def test_bad_frames_are_refused_with_the_reason(encoding: int, payload: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_batch(encoding, payload)


def test_direction_is_checked() -> None:
    enc, payload = encode_batch([status("plant.d", 1, 1.0)])
    with pytest.raises(WireError, match="'status' is not sent in this direction"):
        decode_batch(enc, payload, CLOUD_TO_EDGE)


@given(st.binary(max_size=300), st.sampled_from([ENCODING_MSGPACK, ENCODING_MSGPACK_ZLIB]))
def test_garbage_never_escapes_as_anything_but_wire_error(payload: bytes, encoding: int) -> None:
    with contextlib.suppress(WireError):
        decode_batch(encoding, payload)


@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=30),  # frames sent between events
    st.lists(st.sampled_from(["ack", "reconnect", "lose"]), max_size=30),
    st.randoms(use_true_random=False),
)
def test_every_frame_is_applied_once_in_order_across_reconnects(
    sends: list[int], events: list[str], rnd: Any
) -> None:
    """Sender and receiver over a link that delivers in order but may drop the tail of
    what is in flight when it breaks; frames are replayed after each reconnect."""
    out: Outgoing[int] = Outgoing(window=1000)
    inc = Incoming()
    applied: list[int] = []
    acknowledged: list[int] = []
    in_flight: list[tuple[int, int]] = []  # (seq, meta) sent but not yet delivered
    counter = 0
    for i, n in enumerate(sends):
        for _ in range(n):
            counter += 1
            seq = out.send(pack_batch([{"t": "applied", "dev": "a.b", "rev": counter}]), counter)
            in_flight.append((seq, counter))
        event = events[i] if i < len(events) else "ack"
        if event == "lose":  # the link breaks: an arbitrary tail of in-flight frames is lost
            keep = rnd.randint(0, len(in_flight))
            in_flight = in_flight[:keep]
        for seq, meta in in_flight:
            if inc.accept(seq):
                applied.append(meta)
        in_flight = []
        if event in ("ack", "reconnect"):
            acknowledged += out.on_ack(inc.ack)
        if event in ("reconnect", "lose"):
            # After a reconnect the sender replays everything unacknowledged.
            in_flight = [(seq, out.unacked[seq][1]) for seq, _ in out.replay()]
    for seq, meta in in_flight:
        if inc.accept(seq):
            applied.append(meta)
    acknowledged += out.on_ack(inc.ack)
    assert applied == list(range(1, counter + 1))  # each exactly once, in order
    assert acknowledged == applied and not out.unacked


def test_a_restarted_receiver_starts_from_the_first_frame_it_sees() -> None:
    inc = Incoming()
    assert inc.accept(41) and inc.accept(42)
    assert not inc.accept(42)  # a replay: skip, acknowledge again
    assert inc.ack == 42
    with pytest.raises(WireError, match="frames were lost"):
        inc.accept(44)
    out: Outgoing[str] = Outgoing(window=2)
    out.send(b"", "a")
    out.send(b"", "b")
    assert not out.can_send
    with pytest.raises(WireError, match="window"):
        out.send(b"", "c")
    with pytest.raises(WireError, match="never sent"):
        out.on_ack(3)
    assert out.on_ack(1) == ["a"] and out.on_ack(1) == []


def test_generated_grpc_code_is_not_stale(tmp_path: Path) -> None:
    """Generated modules sit where protoc puts them (protos/edgetwin/X -> edgetwin/X)."""
    subprocess.run([str(ROOT / "scripts" / "gen-protos"), str(tmp_path)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT) for p in (ROOT / "edgetwin").rglob("*_pb2*") if "__pycache__" not in p.parts
    )
    assert fresh and fresh == committed
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"protos/ changed; run scripts/gen-protos ({stale})"


def test_stream_frames_round_trip_in_order_and_a_trickle_costs_a_few_bytes_each() -> None:
    enc, dec = FrameEncoder(), FrameDecoder()
    sizes = []
    for i in range(200):  # one device's temperature, once a second
        batch = [status(f"plant.d{i % 50}", 1000 + i, 20 + (i % 7) / 10)]
        encoding, payload = enc.encode(pack_batch(batch))
        assert encoding == ENCODING_MSGPACK_ZSTREAM
        assert dec.decode(encoding, payload) == batch
        sizes.append(len(payload))
    per_frame_zlib = len(encode_batch([status("plant.d1", 1100, 20.5)])[1])
    # Against the frames before it, a small status message compresses far better than alone.
    assert sum(sizes[-100:]) / 100 < per_frame_zlib / 3, (sizes[-10:], per_frame_zlib)


def test_stream_decoder_refuses_bombs_garbage_and_out_of_order_frames() -> None:
    enc, dec = FrameEncoder(), FrameDecoder()
    with pytest.raises(WireError, match="exceeds"):
        pack_batch([{"t": "hello", "proto": 2, "resume": {"x": "0" * (MAX_BATCH_BYTES + 10)}}])
    zeros = FrameEncoder()
    _, payload = zeros.encode(b"\x00" * (MAX_BATCH_BYTES + 10))
    assert len(payload) < MAX_FRAME_BYTES
    with pytest.raises(WireError, match="exceeds"):
        FrameDecoder().decode(ENCODING_MSGPACK_ZSTREAM, payload)
    first = enc.encode(pack_batch([status("a.b", 1, 1.0)]))
    second = enc.encode(pack_batch([status("a.b", 2, 2.0)]))
    with pytest.raises(WireError):
        dec.decode(*second)  # frames of a stream decode only in order
    assert FrameDecoder().decode(*first)[0]["rev"] == 1


@given(st.lists(st.binary(max_size=200), max_size=5))
def test_stream_garbage_never_escapes_as_anything_but_wire_error(payloads: list[bytes]) -> None:
    dec = FrameDecoder()
    for payload in payloads:
        with contextlib.suppress(WireError):
            dec.decode(ENCODING_MSGPACK_ZSTREAM, payload)


# --------------------------------------------------------------------- compact answers, acks
@given(st.lists(st.integers(0, 2**63 - 1), max_size=60))
def test_applied_revisions_round_trip_compactly(revs: list[int]) -> None:
    encoded = encode_revs(revs)
    assert decode_revs(encoded) == sorted(set(revs))
    msg = {"t": "appliedRevs", "revs": encoded}
    assert unpack_batch(pack_batch([msg]), CLOUD_TO_EDGE) == [msg]


def test_a_run_of_revisions_costs_about_a_byte_each() -> None:
    revs = [1_795_868_346_000_000 + i for i in range(50)]
    per_message = len(
        pack_batch([{"t": "applied", "dev": f"plant.s{i:04d}", "rev": r} for i, r in enumerate(revs)])
    )
    compact = len(pack_batch([{"t": "appliedRevs", "revs": encode_revs(revs)}]))
    assert compact <= 50 + 40 and compact * 10 < per_message, (compact, per_message)


@pytest.mark.parametrize(
    "revs, why",
    [
        ([-1], "revs[0]"),
        ([5, 0], "revs[1]"),
        ([5, -2], "revs[1]"),
        ([True], "revs[0]"),
        ([7, "1"], "revs[1]"),
    ],
)
def test_bad_applied_revisions_are_refused_naming_the_entry(revs: list[Any], why: str) -> None:
    with pytest.raises(WireError, match=rf"message 0: appliedRevs: {re.escape(why)}"):
        unpack_batch(pack_batch([{"t": "appliedRevs", "revs": revs}]), CLOUD_TO_EDGE)


LAZY_S = 24.0  # what the gateway passes for frames of rv messages only (its heartbeat)


@given(st.lists(st.tuples(st.sampled_from(["recv", "lazy", "data", "tick"]), st.floats(0, 30)), max_size=60))
def test_an_ack_is_owed_at_most_its_delay_and_never_for_more_than_ack_every_frames(
    events: list[tuple[str, float]],
) -> None:
    """A receiver driven by AckTimer, as both ends drive it: frames arrive (``lazy``: ones
    whose ack may wait LAZY_S), data frames go out (carrying the ack), and the clock moves.
    Whenever the timer says 0 a bare ack goes. No frame waits longer than its delay for an
    ack, nor do ACK_EVERY of them."""
    timer, now, received, acked = AckTimer(), 0.0, 0, 0
    deadline: float | None = None  # when the oldest unacknowledged frame must be acked

    def settle() -> None:
        nonlocal acked, deadline
        wait = timer.wait(received, now)
        assert (wait is None) == (received == acked and deadline is None)
        if wait == 0:
            timer.carried(received)
            acked, deadline = received, None

    for kind, dt in events:
        # Time moves in steps no longer than the wait the timer asked for, as a loop sleeping on it would.
        wait = timer.wait(received, now)
        now += dt if wait is None else min(dt, wait)
        settle()
        if kind in ("recv", "lazy"):
            received += 1
            delay = LAZY_S if kind == "lazy" else ACK_DELAY_S
            timer.received(now, delay)
            deadline = now + delay if deadline is None else min(deadline, now + delay)
        elif kind == "data":
            timer.carried(received)
            acked, deadline = received, None
        settle()
        assert deadline is None or now <= deadline + 1e-9
        assert received - acked < ACK_EVERY
