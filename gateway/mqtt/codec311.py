"""MQTT 3.1.1 packets the gateway sends and receives, encoded and decoded without I/O.

MQTT 5 packets come from ``mqtt5`` (a sans-IO codec in Rust); it does not speak 3.1.1,
which the embedded broker (amqtt) and older brokers need, so the few 3.1.1 packets a
client uses are written here (OASIS MQTT 3.1.1, section 3). Decoding returns the same
small records for both versions (:mod:`edgetwin.gateway.mqtt.session` uses them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Packet types (the high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14


class MalformedPacket(ValueError):
    """The peer sent bytes that are not an MQTT packet of the expected kind."""


class Incomplete(Exception):
    """More bytes are needed to read the next packet."""


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool
    code: int  # 0: accepted
    reason: str
    receive_max: int = 65535


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    codes: tuple[int, ...]  # per filter: the granted QoS, or >= 0x80 for a failure


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: str


Packet = ConnAck | Publish | PubAck | SubAck | PingResp | Disconnect

_CONNACK_REASONS = {
    0: "accepted",
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect(
    client_id: str,
    keepalive: int,
    clean_session: bool,
    username: str | None = None,
    password: str | None = None,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    flags = 0x02 if clean_session else 0
    payload = _string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _string(topic) + _string(message)
    if username is not None:
        flags |= 0x80
        payload += _string(username)
        if password is not None:
            flags |= 0x40
            payload += _string(password)
    return _packet(CONNECT << 4, _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)


def publish(
    topic: str, payload: bytes, qos: int, retain: bool, packet_id: int | None, dup: bool = False
) -> bytes:
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return _packet(first, body)


def puback(packet_id: int) -> bytes:
    return _packet(PUBACK << 4, struct.pack("!H", packet_id))


def subscribe(packet_id: int, filters: tuple[tuple[str, int], ...]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_string(t) + bytes([q]) for t, q in filters)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def pingreq() -> bytes:
    return bytes([PINGREQ << 4, 0])


def disconnect() -> bytes:
    return bytes([DISCONNECT << 4, 0])


def header(buffer: memoryview, max_size: int) -> tuple[int, int]:
    """(bytes of the fixed header, bytes of the whole packet) of the next packet in
    ``buffer``; :class:`Incomplete` when more are needed. The fixed header is the same in
    MQTT 3.1.1 and 5, so both versions are bounded here."""
    if len(buffer) < 2:
        raise Incomplete
    length, shift, pos = 0, 0, 1
    while True:
        if pos >= len(buffer):
            raise Incomplete
        byte = buffer[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            raise MalformedPacket("remaining length over four bytes")
    if length > max_size:
        raise MalformedPacket(f"a packet of {length} bytes (more than {max_size})")
    if pos + length > len(buffer):
        raise Incomplete
    return pos, pos + length


def read(buffer: memoryview, max_size: int) -> tuple[Packet, int]:
    """The next packet in ``buffer`` and the bytes it took; :class:`Incomplete` when
    more are needed, :class:`MalformedPacket` when they are wrong (or over ``max_size``)."""
    pos, end = header(buffer, max_size)
    first = buffer[0]
    body = bytes(buffer[pos:end])
    kind = first >> 4
    try:
        return _decode(kind, first, body), end
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise MalformedPacket(f"packet type {kind}: {exc}") from None


def _decode(kind: int, first: int, body: bytes) -> Packet:
    if kind == PUBLISH:
        qos = (first >> 1) & 3
        (size,) = struct.unpack_from("!H", body)
        topic = body[2 : 2 + size].decode()
        pos = 2 + size
        packet_id = None
        if qos:
            (packet_id,) = struct.unpack_from("!H", body, pos)
            pos += 2
        return Publish(topic, body[pos:], qos, bool(first & 1), bool(first & 0x08), packet_id)
    if kind == PUBACK:
        return PubAck(struct.unpack_from("!H", body)[0])
    if kind == CONNACK:
        code = body[1]
        return ConnAck(bool(body[0] & 1), code, _CONNACK_REASONS.get(code, f"code {code}"))
    if kind == SUBACK:
        return SubAck(struct.unpack_from("!H", body)[0], tuple(body[2:]))
    if kind == PINGRESP:
        return PingResp()
    raise MalformedPacket(f"unexpected packet type {kind} from the broker")
