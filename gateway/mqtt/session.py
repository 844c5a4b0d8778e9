"""The gateway's MQTT client session as a state machine, without sockets or clocks: bytes
in, packets out; publishes and acknowledgements in, bytes to send out.

* Encoding: MQTT 5 through ``mqtt5`` (sans-IO, Rust), MQTT 3.1.1 through
  :mod:`edgetwin.gateway.mqtt.codec311`. Everything to send is gathered and taken at
  once (:meth:`MqttSession.take`), so many publishes leave in one socket write.
* QoS 1 publishes in flight are bounded by a window: the broker's Receive Maximum (MQTT
  5) or ``max_inflight``; beyond it, and while the transport asks to pause, messages wait
  in a queue bounded by ``max_queued``; one that does not fit is refused (the caller
  counts it). Unacknowledged publishes are sent again, marked DUP, when the broker
  resumes the session after a reconnect.
* Inbound QoS 1 messages are acknowledged only when the caller says (after its commit).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import mqtt5

from edgetwin.gateway.mqtt import codec311
from edgetwin.gateway.mqtt.codec311 import (
    ConnAck,
    Disconnect,
    Incomplete,
    MalformedPacket,
    Packet,
    PingResp,
    PubAck,
    Publish,
    SubAck,
)

__all__ = [
    "ConnAck",
    "Disconnect",
    "MalformedPacket",
    "MqttSession",
    "Packet",
    "PingResp",
    "PubAck",
    "Publish",
    "SessionOptions",
    "SubAck",
]

# The largest packet accepted from the broker: a bound on the receive buffer. Larger
# application payloads are refused by the gateway anyway (mqtt.max_payload).
MAX_INBOUND_PACKET = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SessionOptions:
    client_id: str
    v5: bool = True
    keepalive: int = 30
    username: str | None = None
    password: str | None = None
    will: tuple[str, bytes] | None = None  # sent retained, QoS 1
    receive_maximum: int = 1000  # what the gateway lets the broker have in flight to it (v5)
    session_expiry_s: int = 7 * 24 * 3600
    max_inflight: int = 1000  # QoS 1 publishes in flight, unless the broker says fewer (v5)
    max_queued: int = 20_000


class MqttSession:
    """One client session, across reconnects (in-flight publishes survive them)."""

    def __init__(self, options: SessionOptions) -> None:
        self.o = options
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._next_id = 0
        # Outgoing QoS 1 publishes not yet acknowledged, by packet id (insertion order).
        self.inflight: dict[int, tuple[str, bytes, bool]] = {}
        self.window = options.max_inflight
        self.queue: collections.deque[tuple[str, bytes, int, bool]] = collections.deque()
        self.paused = False  # the transport's buffer is full: queue instead of sending
        self.open = False

    # ----------------------------------------------------------------- connection
    def connect(self) -> None:
        """Start a connection: the CONNECT packet (a persistent session)."""
        self._buffer.clear()
        self._out.clear()
        self.open = False
        o = self.o
        if o.v5:
            will = None
            if o.will is not None:
                will = mqtt5.Will(o.will[0], payload=o.will[1], qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True)
            packet = mqtt5.ConnectPacket(
                o.client_id,
                username=o.username,
                password=o.password.encode() if o.password is not None else None,
                clean_start=False,
                will=will,
                keep_alive=o.keepalive,
                session_expiry_interval=o.session_expiry_s,
                receive_max=o.receive_maximum,
            )
            self._out.append(packet.write())
        else:
            will311 = (o.will[0], o.will[1], 1, True) if o.will is not None else None
            self._out.append(
                codec311.connect(o.client_id, o.keepalive, False, o.username, o.password, will311)
            )

    def connected(self, ack: ConnAck) -> None:
        """The broker accepted the connection: resend what it has not acknowledged (as
        DUP when it kept the session), then what waited."""
        self.open = True
        self.window = max(1, min(self.o.max_inflight, ack.receive_max))
        for packet_id, (topic, payload, retain) in self.inflight.items():
            self._out.append(self._publish_bytes(topic, payload, 1, retain, packet_id, ack.session_present))
        self._release()

    def lost(self) -> None:
        """The connection ended; in-flight publishes wait for the next one."""
        self.open = False
        self.paused = False
        self._buffer.clear()
        self._out.clear()

    # ----------------------------------------------------------------- inbound
    def receive(self, data: bytes) -> list[Packet]:
        """Feed bytes from the broker; returns the complete packets in them.
        Raises :class:`MalformedPacket` on bytes that are not MQTT (the caller closes)."""
        buf = self._buffer
        buf += data
        packets: list[Packet] = []
        # Parsed from an immutable copy: the bytearray is resized below, which views of
        # it (held by a traceback, say) would forbid.
        view = memoryview(bytes(buf))
        pos = 0
        while pos < len(view):
            try:
                if self.o.v5:
                    _, end = codec311.header(view[pos:], MAX_INBOUND_PACKET)
                    raw, used = mqtt5.read(view[pos : pos + end])
                    pos += used
                    converted = _from_v5(raw)
                    if converted is not None:
                        packets.append(converted)
                else:
                    decoded, used = codec311.read(view[pos:], MAX_INBOUND_PACKET)
                    pos += used
                    packets.append(decoded)
            except Incomplete:
                break
            except MalformedPacket:
                raise
            except (ValueError, IndexError) as exc:  # mqtt5's errors for bad bytes
                raise MalformedPacket(str(exc)) from None
        del buf[:pos]
        for packet in packets:
            if isinstance(packet, PubAck):
                self.inflight.pop(packet.packet_id, None)
        if packets:
            self._release()
        return packets

    # ----------------------------------------------------------------- outbound
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Send (or queue) a message; False when the queue is full (it is dropped).
        Raises ValueError for a topic no broker accepts (empty, wildcards, NUL)."""
        if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > 65535:
            raise ValueError(f"not a topic to publish to: {topic[:100]!r}")
        if (
            self.open
            and not self.paused
            and not self.queue
            and (qos == 0 or len(self.inflight) < self.window)
        ):
            self._send(topic, payload, qos, retain)
            return True
        if len(self.queue) >= self.o.max_queued:
            return False
        self.queue.append((topic, payload, qos, retain))
        return True

    def ack(self, packet_id: int) -> None:
        """Acknowledge an inbound QoS 1 message (its effects are durable)."""
        self._out.append(mqtt5.PubAckPacket(packet_id).write() if self.o.v5 else codec311.puback(packet_id))

    def subscribe(self, filters: tuple[tuple[str, int], ...]) -> int:
        packet_id = self._packet_id()
        if self.o.v5:
            topic_filters = [mqtt5.TopicFilter(t, max_qos=mqtt5.QoS(q)) for t, q in filters]
            self._out.append(mqtt5.SubscribePacket(packet_id, topic_filters).write())
        else:
            self._out.append(codec311.subscribe(packet_id, filters))
        return packet_id

    def ping(self) -> None:
        self._out.append(mqtt5.PingReqPacket().write() if self.o.v5 else codec311.pingreq())

    def disconnect(self) -> None:
        self._out.append(mqtt5.DisconnectPacket().write() if self.o.v5 else codec311.disconnect())
        self.open = False

    def resume(self) -> None:
        """The transport can take more: send what waited, up to the window."""
        self.paused = False
        self._release()

    def take(self) -> bytes:
        """Everything to send now, as one buffer."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    # ----------------------------------------------------------------- internals
    def _release(self) -> None:
        queue = self.queue
        while queue and self.open and not self.paused:
            topic, payload, qos, retain = queue[0]
            if qos and len(self.inflight) >= self.window:
                break
            queue.popleft()
            self._send(topic, payload, qos, retain)

    def _send(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        packet_id = None
        if qos:
            packet_id = self._packet_id()
            self.inflight[packet_id] = (topic, payload, retain)
        self._out.append(self._publish_bytes(topic, payload, qos, retain, packet_id, False))

    def _publish_bytes(
        self, topic: str, payload: bytes, qos: int, retain: bool, packet_id: int | None, dup: bool
    ) -> bytes:
        if self.o.v5:
            return mqtt5.PublishPacket(
                topic, payload, qos=mqtt5.QoS(qos), retain=retain, packet_id=packet_id, duplicate=dup
            ).write()
        return codec311.publish(topic, payload, qos, retain, packet_id, dup)

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("no free packet id")  # unreachable: the window is at most 65535


def _from_v5(packet: object) -> Packet | None:
    if isinstance(packet, mqtt5.PublishPacket):
        return Publish(
            packet.topic, packet.payload, int(packet.qos), packet.retain, packet.duplicate, packet.packet_id
        )
    if isinstance(packet, mqtt5.PubAckPacket):
        return PubAck(packet.packet_id)
    if isinstance(packet, mqtt5.ConnAckPacket):
        return ConnAck(
            packet.session_present,
            int(packet.reason_code),
            packet.reason_str or packet.reason_code.name.lower().replace("_", " "),
            packet.receive_max,
        )
    if isinstance(packet, mqtt5.SubAckPacket):
        return SubAck(packet.packet_id, tuple(int(c) for c in packet.reason_codes))
    if isinstance(packet, mqtt5.PingRespPacket):
        return PingResp()
    if isinstance(packet, mqtt5.DisconnectPacket):
        return Disconnect(packet.reason_str or packet.reason_code.name.lower().replace("_", " "))
    return None  # AUTH and the QoS 2 packets: the gateway subscribes at QoS <= 1
