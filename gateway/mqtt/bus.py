"""The gateway's MQTT connection: an asyncio protocol over the sans-IO session
(:mod:`edgetwin.gateway.mqtt.session`), in the event loop's thread.

* Acknowledge after commit: the PUBACK of an inbound QoS 1 message is sent only when the
  service calls :meth:`MqttBus.ack` after the store commit. Until then the broker keeps
  the message in our persistent session and redelivers it after a crash or reconnect.
* No thread hop, few writes: packets are decoded where the bytes arrive and handed to
  the service in the same loop iteration; everything the service sends while it runs
  (answers, retained values, acknowledgements) leaves in one socket write, at the end of
  the iteration. (paho, before, cost ~90 us per retained QoS 1 publish: its network
  thread, a lock and a socket send per message.)
* Keepalive: a PINGREQ when nothing was sent for half the keepalive; nothing received
  for 1.5 keepalives ends the connection.

Reconnects back off exponentially with jitter; the persistent session (MQTT 5 session
expiry, or clean_session=False on 3.1.1) keeps subscriptions and unacknowledged messages.
Outgoing QoS 1 messages in flight are bounded by the broker's Receive Maximum (or
``max_inflight_outgoing``), the rest by ``max_queued_outgoing``; one that does not fit is
dropped and counted, and every retained value is republished on reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edgetwin.gateway.config import MqttConfig
from edgetwin.gateway.mqtt.session import (
    ConnAck,
    Disconnect,
    MalformedPacket,
    MqttSession,
    PingResp,
    PubAck,
    Publish,
    SessionOptions,
    SubAck,
)
from edgetwin.gateway.ops.metrics import Metrics
from edgetwin.runtime.aio import wait_within

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
CONNECT_TIMEOUT_S = 10.0
CLOSE_WAIT_S = 2.0


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int  # which connection it came on; acks go only to the same one
    dup: bool = False  # the broker marks this delivery a redelivery (MQTT DUP flag)


class _Protocol(asyncio.Protocol):
    """Bytes in and out of one TCP (or TLS) connection; the bus decides."""

    def __init__(self, bus: MqttBus) -> None:
        self.bus = bus
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=1 << 20)

    def data_received(self, data: bytes) -> None:
        self.bus._received(data)

    def pause_writing(self) -> None:
        self.bus.session.paused = True

    def resume_writing(self) -> None:
        self.bus.session.resume()
        self.bus._flush_soon()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(str(exc) if exc else "the broker closed the connection")

    def abort(self, why: str) -> None:
        if not self.closed.done():
            self.closed.set_result(why)
        if self.transport is not None:
            self.transport.abort()


class MqttBus:
    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        subscriptions: tuple[tuple[str, int], ...],
        metrics: Metrics,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.metrics = metrics
        self.connected = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.session = MqttSession(
            SessionOptions(
                client_id,
                v5=cfg.protocol == "5",
                keepalive=cfg.keepalive,
                username=cfg.username,
                password=cfg.password,
                will=will,
                receive_maximum=cfg.receive_maximum,
                session_expiry_s=min(cfg.session_expiry // 1000, 0xFFFFFFFF),
                max_inflight=cfg.max_inflight_outgoing,
                max_queued=cfg.max_queued_outgoing,
            )
        )
        self._generation = 0
        # Progress, for the health monitor: messages handled; QoS 1 publishes handed to
        # the connection and acknowledged by the broker on it.
        self.handled = 0
        self.published = 0
        self.publish_acks = 0
        self._on_message: Callable[[Inbound], None] = lambda m: None
        self._protocol: _Protocol | None = None
        self._connack: asyncio.Future[ConnAck] | None = None
        self._flush_scheduled = False
        self._last_sent = self._last_received = 0.0
        self._closing = False
        self._errors_logged = 0

    # ----------------------------------------------------------------- inbound
    def _received(self, data: bytes) -> None:
        self._last_received = time.monotonic()
        try:
            packets = self.session.receive(data)
        except MalformedPacket as exc:
            if self._protocol is not None:
                self._protocol.abort(f"malformed packet from the broker: {exc}")
            return
        for packet in packets:
            if isinstance(packet, Publish):
                self._deliver(packet)
            elif isinstance(packet, PubAck):
                self.publish_acks += 1
            elif isinstance(packet, ConnAck):
                if self._connack is not None and not self._connack.done():
                    self._connack.set_result(packet)
            elif isinstance(packet, SubAck):
                failed = [
                    t for (t, _), code in zip(self.subscriptions, packet.codes, strict=False) if code >= 0x80
                ]
                if failed:
                    log.error("the broker refused subscriptions", extra={"topics": ",".join(failed)})
            elif isinstance(packet, Disconnect) and self._protocol is not None:
                self._protocol.abort(f"the broker disconnected: {packet.reason}")
            elif isinstance(packet, PingResp):
                pass
        self._flush_soon()  # acks of QoS 0 aside, releasing the window may have queued sends

    def _deliver(self, packet: Publish) -> None:
        msg = Inbound(
            packet.topic, packet.payload, packet.qos, packet.packet_id or 0, self._generation, packet.dup
        )
        self.handled += 1
        try:
            self._on_message(msg)
        except Exception as exc:  # the handler should not raise; never strand the rest
            self.metrics.inc("inbound_handler_errors")
            if self._errors_logged < 10:
                self._errors_logged += 1
                log.error("inbound message handler raised", extra={"topic": msg.topic[:200]}, exc_info=exc)

    @property
    def publishes_unacked(self) -> int:
        """QoS 1 publishes on this connection the broker has not acknowledged yet."""
        return max(0, self.published - self.publish_acks)

    @property
    def inbox_waiting(self) -> int:
        return 0  # messages are handled where they are decoded

    # ----------------------------------------------------------------- outbound
    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.session.take()
        protocol = self._protocol
        if data and protocol is not None and protocol.transport is not None:
            protocol.transport.write(data)
            self._last_sent = time.monotonic()

    def ack(self, msg: Inbound) -> None:
        """Acknowledge a message whose effects are committed. A message from an earlier
        connection is not acknowledged: the broker redelivers it, and applying it twice
        is harmless."""
        if msg.qos == 0 or msg.generation != self._generation or not self.connected.is_set():
            return
        self.session.ack(msg.mid)
        self._flush_soon()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Hand a message to the connection without waiting for its PUBACK. Returns False
        (and counts it) when it cannot be sent now."""
        if not self.connected.is_set():
            self.metrics.inc("publish_dropped_disconnected")
            return False
        try:
            queued = self.session.publish(topic, payload, qos, retain)
        except ValueError:
            self.metrics.inc("publish_dropped_invalid_topic")
            return False
        if not queued:
            self.metrics.inc("publish_dropped_queue_full")
            return False
        if qos:
            self.published += 1
        self._flush_soon()
        return True

    # ----------------------------------------------------------------- connection
    def _tls(self) -> ssl.SSLContext | None:
        if not self.cfg.use_tls:
            return None
        tls = self.cfg.tls
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls and tls.ca_file else None)
        if tls is not None and tls.cert_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        if tls is not None and tls.insecure:
            context.check_hostname = False  # the chain is still verified
        return context

    async def _connect(self, host: str, port: int) -> _Protocol:
        self.session.connect()
        self._connack = self._loop.create_future()
        tls = self._tls()
        _, protocol = await self._loop.create_connection(
            lambda: _Protocol(self), host, port, ssl=tls, server_hostname=host if tls else None
        )
        self._protocol = protocol
        self._flush()  # CONNECT
        waiter: asyncio.Future[ConnAck] = self._connack

        def refuse(closed: asyncio.Future[str]) -> None:
            if not waiter.done():  # the connection ended before the CONNACK
                waiter.set_exception(ConnectionError(closed.result()))

        protocol.closed.add_done_callback(refuse)
        ack = await waiter
        if ack.code != 0:
            protocol.abort("refused")
            raise ConnectionError(f"broker refused the connection: {ack.reason}")
        return protocol

    async def run(
        self,
        on_message: Callable[[Inbound], None],
        on_connect: Callable[[], Awaitable[None]],
    ) -> None:
        """Connect, subscribe and deliver messages forever, reconnecting with backoff and
        jitter. Returns only when cancelled."""
        self._on_message = on_message
        host, port = self.cfg.host_port
        delay = RECONNECT_MIN_S
        while True:
            protocol = None
            try:
                protocol = await wait_within(self._connect(host, port), CONNECT_TIMEOUT_S)
                self._generation += 1
                self.published = self.publish_acks = 0  # a new connection: count afresh
                assert self._connack is not None
                self.session.connected(self._connack.result())
                self.session.subscribe(self.subscriptions)
                self._flush()
                self._last_received = self._last_sent = time.monotonic()
                self.connected.set()
                self.metrics.inc("mqtt_connects")
                log.info("mqtt connected", extra={"broker": f"{host}:{port}", "protocol": self.cfg.protocol})
                delay = RECONNECT_MIN_S
                await on_connect()
                why = await self._keepalive(protocol)
                raise ConnectionError(why)
            except asyncio.CancelledError:
                if protocol is not None and protocol.transport is not None:
                    protocol.transport.abort()
                raise
            except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                self.connected.clear()
                self.session.lost()
                if protocol is not None and protocol.transport is not None:
                    protocol.transport.abort()
                if self._closing:
                    return
                self.metrics.inc("mqtt_disconnects")
                log.warning(
                    "mqtt connection lost; reconnecting",
                    extra={
                        "broker": f"{host}:{port}",
                        "error": str(exc) or type(exc).__name__,
                        "retry_s": round(delay, 1),
                    },
                )
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(RECONNECT_MAX_S, delay * 2)

    async def _keepalive(self, protocol: _Protocol) -> str:
        """Until the connection ends (returns why): PINGREQ after half the keepalive of
        silence from us; nothing from the broker for 1.5 keepalives is a dead link."""
        keepalive = float(self.cfg.keepalive)
        while not protocol.closed.done():
            now = time.monotonic()
            if now - self._last_received > 1.5 * keepalive:
                protocol.abort(f"nothing from the broker for {1.5 * keepalive:g} s")
                break
            if now - self._last_sent >= keepalive / 2:
                self.session.ping()
                self._flush()
            with_timeout = min(1.0, keepalive / 4)
            done, _ = await asyncio.wait({protocol.closed}, timeout=with_timeout)
            if done:
                break
        return protocol.closed.result()

    async def close(self, final: tuple[str, bytes] | None = None) -> None:
        """Publish ``final`` (e.g. the gateway's offline status) and disconnect."""
        self._closing = True
        protocol = self._protocol
        if protocol is None or protocol.transport is None or not self.connected.is_set():
            return
        if final is not None and self.publish(final[0], final[1], 1, True):
            # Best effort: the will says "offline" anyway if this does not get out.
            deadline = time.monotonic() + CLOSE_WAIT_S
            while self.session.inflight and time.monotonic() < deadline and not protocol.closed.done():  # noqa: ASYNC110 (the PUBACK comes through data_received)
                await asyncio.sleep(0.02)
        self.session.disconnect()
        self._flush()
        protocol.transport.close()
        self.connected.clear()
