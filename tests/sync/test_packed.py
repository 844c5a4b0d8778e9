"""Packed status (edgetwin/sync/packed.py): whatever status messages a stream carries,
the relay's decoder gives back exactly what the gateway packed (value texts included),
a reading costs a few bytes, and malformed bodies are refused with a PackError only."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetwin.sync.packed import MAX_NAME_BYTES, MAX_NAMES, PackError, StatusPacker, StatusUnpacker
from edgetwin.sync.wire import FrameEncoder, pack_batch, unpack_batch


def reported(value: str, ts: int, version: int, typ: str = "float") -> dict[str, Any]:
    meta = {"timestamp": str(ts), "version": str(version), "type": typ}
    return {"reported": {"value": value, "metadata": meta}}


def status(dev: str, rev: int, twins: dict[str, Any], **device: Any) -> dict[str, Any]:
    return {"t": "status", "dev": dev, "rev": rev, "patch": {**device, "twins": twins}}


def round_trip(batches: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Each batch packed, through msgpack (as a frame carries it), unpacked, in order."""
    packer, unpacker, out = StatusPacker(), StatusUnpacker(), []
    for batch in batches:
        got: list[dict[str, Any]] = []
        for msg in unpack_batch(pack_batch(packer.pack(batch))):
            got.extend(unpacker.unpack(msg["b"]) if msg["t"] == "packed" else [msg])
        out.append(got)
    return out


def by_rev(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(messages, key=lambda m: (m["dev"], m["rev"], str(m.get("part"))))


TEXTS = [
    "-417.23", "0", "-0", "007", "0.05", "-0.05", "1e-05", "nan", "inf", "-inf", "417.2300109863281",
    "0.30000000000000004", "123456789012345678901234567890", "3.", ".5", "true", "ON", "",
    "x" * 300, "\u00e9t\u00e9", "1_000", "+5", "1.0", "12345678901234567890", "-9223372036854775808",
]  # fmt: skip

values = st.one_of(
    st.sampled_from(TEXTS),
    st.floats(allow_nan=True).map(repr),
    st.floats(width=32).map(repr),
    st.integers(-(10**25), 10**25).map(str),
    st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str),
    st.text(max_size=40),
)
ints = st.integers(0, 2**63)
types = st.sampled_from(["float", "int", "string"])
metadata = st.one_of(
    st.fixed_dictionaries({"timestamp": ints.map(str), "version": ints.map(str), "type": types}),
    st.fixed_dictionaries({"timestamp": st.text(max_size=5), "version": ints.map(str), "type": types}),
    st.fixed_dictionaries({"timestamp": ints.map(str), "version": ints.map(str)}),
)
twin_entry = st.one_of(
    st.none(),
    st.fixed_dictionaries({"reported": st.fixed_dictionaries({"value": values, "metadata": metadata})}),
    st.fixed_dictionaries(
        {
            "reported": st.fixed_dictionaries({"value": values, "metadata": metadata}),
            "observedDesired": st.fixed_dictionaries({"value": values}),
        }
    ),
    st.fixed_dictionaries({"readError": st.one_of(st.none(), st.text(max_size=10))}),
    st.fixed_dictionaries({"reported": st.fixed_dictionaries({"value": st.integers(-(2**63), 2**63)})}),
)
patches = st.fixed_dictionaries(
    {},
    optional={
        "twins": st.dictionaries(
            st.sampled_from(["p0", "p1", "temperature", "\u00fcber", "p" * 40]), twin_entry
        ),
        "state": st.sampled_from(["online", "offline"]),
        "conditions": st.dictionaries(st.sampled_from(["Ready", "DesiredConflict"]), st.none()),
    },
)
messages = st.builds(
    lambda dev, rev, patch, part: {"t": "status", "dev": dev, "rev": rev, "patch": patch, **part},
    st.sampled_from(["plant.a", "plant.b", "lab.\u00e9", "x." + "y" * 300]),
    st.integers(1, 2**63),
    patches,
    st.one_of(st.just({}), st.just({"part": [0, 2]})),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(messages, max_size=6), max_size=6))
def test_every_status_comes_back_as_it_was_packed(batches: list[list[dict[str, Any]]]) -> None:
    for sent, got in zip(batches, round_trip(batches), strict=True):
        assert by_rev(got) == by_rev(sent)


@pytest.mark.parametrize("text", TEXTS)
def test_a_value_text_comes_back_exactly(text: str) -> None:
    sent = [status("plant.a", 10, {"p": reported(text, 1_796_624_348_685, 3)})]
    assert round_trip([sent, sent]) == [sent, sent]


def test_versions_given_out_of_step_and_timestamps_going_back_come_back() -> None:
    a, b = "plant.a", "plant.b"
    batches = [
        [status(a, 9, {"p": reported("1", 5_000, 1)}), status(a, 7, {"p": reported("2", 10, 9)})],
        [status(a, 8, {"p": reported("3", 4_000, 2)}), status(b, 2**62, {"p": reported("4", 0, 1)})],
    ]
    assert round_trip(batches) == batches


def test_a_reading_costs_a_few_bytes() -> None:
    """50 devices x 10 properties, one random reading each per second: the shape of the
    link bench's steady state. After the first second has named every device and
    property, a reading is at most 10 bytes packed and about 7 compressed (what it holds:
    device 6 bits, property 3, reading 17, millisecond within the second 10)."""
    rng = random.Random(7)
    packer, encoder = StatusPacker(), FrameEncoder()
    rev, versions, sizes = 1_796_624_336_106_001, {}, []  # type: int, dict[tuple[int, int], int], list[tuple[int, int]]
    for second in range(20):
        batch = []
        # Readings arrive (revisions) in the order they were taken (timestamps).
        offsets = sorted(rng.randrange(1000) for _ in range(50))
        for d in range(50):
            p = rng.randrange(10)
            versions[d, p] = versions.get((d, p), 0) + 1
            rev += 1
            ts = 1_796_624_348_000 + second * 1000 + offsets[d]
            value = f"{round(rng.uniform(-500, 500), 2)}"
            batch.append(status(f"plant.s{d:04d}", rev, {f"p{p}": reported(value, ts, versions[d, p])}))
        packed = packer.pack(batch)
        raw = pack_batch(packed)
        sizes.append((len(packed[0]["b"]), len(encoder.encode(raw)[1])))
    body = sum(b for b, _ in sizes[1:]) / (19 * 50)
    wire = sum(z for _, z in sizes[1:]) / (19 * 50)
    assert body <= 10.0, body
    assert wire <= 7.5, wire


def test_a_float32_reading_takes_four_bytes() -> None:
    text = repr(struct.unpack("<f", struct.pack("<f", 417.23))[0])
    assert text == "417.2300109863281"
    packer = StatusPacker()
    first = packer.pack([status("plant.a", 1, {"p": reported("1", 1, 1)})])[0]["b"]
    body = packer.pack([status("plant.a", 2, {"p": reported(text, 1, 2)})])[0]["b"]
    # dev, rev, count, property, value (1 + 4), timestamp
    assert len(body) == 1 + 1 + 1 + 1 + 5 + 1, (first, body)


def test_parts_and_long_names_go_as_plain_status() -> None:
    long_dev = "plant." + "x" * MAX_NAME_BYTES
    part = {**status("plant.a", 3, {"p": reported("1", 1, 1)}), "part": [0, 2]}
    plain = status(long_dev, 4, {"p": reported("1", 1, 1)})
    out = StatusPacker().pack([part, plain])
    assert out == [part, plain]


def test_a_full_property_table_leaves_values_in_msgpack() -> None:
    packer, unpacker = StatusPacker(), StatusUnpacker()
    packer.props = [("n", "float")] * MAX_NAMES  # as if the stream had named them all
    unpacker.props = list(packer.props)
    sent = [status("plant.a", 1, {"new": reported("1.5", 1, 1)})]
    (msg,) = packer.pack(sent)
    assert unpacker.unpack(msg["b"]) == sent


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\x05", "device index 4 was never defined"),
        (b"\x00\x03ab", "body ends inside a 3-byte field"),
        (b"\x00\x02\xff\xfe", "not utf-8"),
        (b"\x00\x01a\x02", "body ends inside a number"),
        (b"\x00\x01a\x00", "revision 0"),
        (b"\x00\x01a\x02\x02\x0a", "property index 4 was never defined"),
        (b"\x00\x01a\x02\x01\x03ab", "body ends inside a 3-byte field"),
        (b"\x00\x01a\x02\x01\x01\xc1", "the rest of a status is not msgpack"),
        (b"\x00\x01a\x02\x01\x01\x01", "the rest of a status is a map, not int"),
        (b"\x00\x01a" + b"\xff" * 11, "number over 64 bits"),
        (b"\x00\x01a\x02\x02\x00\x01p\x05float\x01", "body ends inside a number"),
        (b"\x00\x01a\x02\x02\x01\x01p\x05float\x01\x01\x01", "version -1"),
        (b"\x00\x01a\x02\x02\x00\x01p\x05float\xfd\x01", "a decimal with 63 decimals"),
        (b"\x00\x01a\x02\x02\x00\x01p\x05float\x01\x01\x03", "timestamp -2"),
        (b"\x00\x81\x08" + b"a" * 1025, "a name of 1025 bytes"),
    ],
)
def test_malformed_bodies_are_refused_naming_the_problem(body: bytes, why: str) -> None:
    with pytest.raises(PackError, match=why):
        StatusUnpacker().unpack(body)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_garbage_never_escapes_as_anything_but_pack_error(bodies: list[bytes]) -> None:
    unpacker = StatusUnpacker()
    for body in bodies:
        try:
            unpacker.unpack(body)
        except PackError:
            return
