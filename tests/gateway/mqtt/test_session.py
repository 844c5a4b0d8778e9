"""The MQTT client session, sans-IO (gateway/mqtt/session.py): bytes split anywhere
decode to the same packets, garbage is a MalformedPacket and nothing else, the in-flight
window and the queue hold their bounds and keep the order, and a resumed session sends
what the broker has not acknowledged again, marked DUP. Both protocol versions."""

from __future__ import annotations

import contextlib
import itertools

import mqtt5
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetwin.gateway.mqtt import codec311
from edgetwin.gateway.mqtt.session import (
    ConnAck,
    MalformedPacket,
    MqttSession,
    PubAck,
    Publish,
    SessionOptions,
)

VERSIONS = [True, False]
TOPICS = st.text(st.characters(exclude_characters="+#\0", exclude_categories=["Cs"]), min_size=1, max_size=30)


def broker_publish(v5: bool, topic: str, payload: bytes, packet_id: int, dup: bool = False) -> bytes:
    if v5:
        return mqtt5.PublishPacket(
            topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=packet_id, duplicate=dup
        ).write()
    return codec311.publish(topic, payload, 1, False, packet_id, dup)


def broker_puback(v5: bool, packet_id: int) -> bytes:
    return mqtt5.PubAckPacket(packet_id).write() if v5 else codec311.puback(packet_id)


def sent_publishes(v5: bool, data: bytes) -> list[Publish]:
    """Decode what the client sent, as the broker would."""
    out, view, pos = [], memoryview(data), 0
    while pos < len(data):
        if v5:
            packet, used = mqtt5.read(view[pos:])
            if isinstance(packet, mqtt5.PublishPacket):
                out.append(
                    Publish(
                        packet.topic,
                        packet.payload,
                        int(packet.qos),
                        packet.retain,
                        packet.duplicate,
                        packet.packet_id,
                    )
                )
        else:
            first = data[pos]
            _, end = codec311.header(view[pos:], 1 << 30)
            if first >> 4 == codec311.PUBLISH:
                packet311, _ = codec311.read(view[pos:], 1 << 30)
                assert isinstance(packet311, Publish)
                out.append(packet311)
            used = end
        pos += used
    return out


def opened(v5: bool, **options: int) -> MqttSession:
    session = MqttSession(SessionOptions("gw", v5=v5, **options))  # type: ignore[arg-type]
    session.connect()
    session.take()
    session.connected(ConnAck(False, 0, "ok"))
    return session


@pytest.mark.parametrize("v5", VERSIONS)
@given(
    messages=st.lists(st.tuples(TOPICS, st.binary(max_size=300)), min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=10),
)
@settings(max_examples=60)
def test_bytes_split_anywhere_decode_to_the_same_packets(
    v5: bool, messages: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(broker_publish(v5, t, p, i + 1) for i, (t, p) in enumerate(messages))
    session = opened(v5)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    got = []
    for a, b in itertools.pairwise(points):
        got += session.receive(stream[a:b])
    assert [(p.topic, p.payload, p.packet_id) for p in got if isinstance(p, Publish)] == [
        (t, p, i + 1) for i, (t, p) in enumerate(messages)
    ]


@pytest.mark.parametrize("v5", VERSIONS)
@given(garbage=st.binary(min_size=1, max_size=200))
@settings(max_examples=200)
def test_garbage_from_the_broker_is_a_malformed_packet_and_nothing_else(v5: bool, garbage: bytes) -> None:
    session = opened(v5)
    with contextlib.suppress(MalformedPacket):
        session.receive(garbage)


@pytest.mark.parametrize("v5", VERSIONS)
def test_a_packet_over_the_bound_is_refused_before_it_is_buffered(v5: bool) -> None:
    session = opened(v5)
    header = bytes([0x30]) + bytes([0xFF, 0xFF, 0xFF, 0x7F])  # a PUBLISH of 256 MiB
    with pytest.raises(MalformedPacket):
        session.receive(header)


@pytest.mark.parametrize("v5", VERSIONS)
@given(
    ops=st.lists(st.one_of(st.just("publish"), st.just("ack"), st.just("ack_oldest")), max_size=120),
    window=st.integers(min_value=1, max_value=8),
    queued=st.integers(min_value=1, max_value=10),
)
@settings(max_examples=100)
def test_the_window_and_the_queue_hold_their_bounds_and_keep_the_order(
    v5: bool, ops: list[str], window: int, queued: int
) -> None:
    session = opened(v5, max_inflight=window, max_queued=queued)
    accepted: list[bytes] = []
    sent: list[Publish] = []
    n = 0
    for op in ops:
        if op == "publish":
            payload = str(n).encode()
            n += 1
            if session.publish("t", payload, 1):
                accepted.append(payload)
        elif session.inflight:
            packet_id = next(iter(session.inflight)) if op == "ack_oldest" else list(session.inflight)[-1]
            got = session.receive(broker_puback(v5, packet_id))
            assert got == [PubAck(packet_id)]
        sent += sent_publishes(v5, session.take())
        assert len(session.inflight) <= window
        assert len(session.queue) <= queued
    # Everything accepted was sent once, in order, or is still waiting (in that order).
    waiting = [p for _, p, _, _ in session.queue]
    assert [p.payload for p in sent] + waiting == accepted
    assert not any(p.dup for p in sent)


@pytest.mark.parametrize("v5", VERSIONS)
def test_a_resumed_session_sends_what_was_not_acknowledged_again_as_dup(v5: bool) -> None:
    session = opened(v5, max_inflight=2)
    for i in range(4):
        assert session.publish("t", f"m{i}".encode(), 1)
    first = sent_publishes(v5, session.take())
    assert [p.payload for p in first] == [b"m0", b"m1"]
    session.receive(broker_puback(v5, first[0].packet_id or 0))
    assert [p.payload for p in sent_publishes(v5, session.take())] == [b"m2"]
    session.lost()
    assert not session.publish("t", b"late", 1) or session.queue[-1][1] == b"late"
    session.connect()
    session.take()
    session.connected(ConnAck(True, 0, "ok"))
    again = sent_publishes(v5, session.take())
    assert [(p.payload, p.dup) for p in again[:2]] == [(b"m1", True), (b"m2", True)]
    assert [p.payload for p in again[2:]] == [b"m3", b"late"][: len(again) - 2]


@pytest.mark.parametrize("v5", VERSIONS)
def test_acks_of_inbound_messages_leave_only_when_asked(v5: bool) -> None:
    session = opened(v5)
    got = session.receive(broker_publish(v5, "in", b"x", 42))
    assert isinstance(got[0], Publish) and got[0].packet_id == 42
    assert session.take() == b""  # nothing acknowledged by itself
    session.ack(42)
    assert session.take() == broker_puback(v5, 42)


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\0b"])
def test_a_topic_no_broker_takes_is_refused_before_it_is_queued(topic: str) -> None:
    session = opened(True)
    with pytest.raises(ValueError, match="not a topic"):
        session.publish(topic, b"x", 1)
    assert not session.queue and not session.inflight
