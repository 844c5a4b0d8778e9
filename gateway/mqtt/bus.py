"""The gateway's MQTT connection: aiomqtt for the connection, subscriptions and the
message stream, with paho's manual acknowledgement turned on deliberately.

Why not plain aiomqtt: it acknowledges a QoS 1 message as soon as it is queued, so a
crash between receipt and commit would lose it. Here the PUBACK is sent only when the
service calls :meth:`MqttBus.ack` after the store commit; until then the broker keeps the
message in our persistent session and redelivers it after a crash or reconnect.

Outgoing messages are handed to paho without awaiting their PUBACK (awaiting each one
would serialise the hot path); paho's queue is bounded by ``max_queued_outgoing`` and a
message that does not fit is dropped and counted. While disconnected nothing is queued:
the service republishes every retained value and pending delta on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttConfig
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int  # which connection it came on; acks go only to the same one


class MqttBus:
    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        subscriptions: tuple[str, ...],
        metrics: Metrics,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.metrics = metrics
        self.will = will
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._paho: paho.Client | None = None
        self._generation = 0

    def _broker_text(self) -> str:
        host, port = self.cfg.host_port
        return f"{host}:{port}"

    def _make_client(self) -> aiomqtt.Client:
        host, port = self.cfg.host_port
        v5 = self.cfg.protocol == "5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = min(self.cfg.session_expiry // 1000, 0xFFFFFFFF)
            props.ReceiveMaximum = self.cfg.receive_maximum
        tls_params = None
        if self.cfg.use_tls:
            tls = self.cfg.tls
            tls_params = aiomqtt.TLSParameters(
                ca_certs=str(tls.ca_file) if tls and tls.ca_file else None,
                certfile=str(tls.cert_file) if tls and tls.cert_file else None,
                keyfile=str(tls.key_file) if tls and tls.key_file else None,
            )
        will = None
        if self.will is not None:
            will = aiomqtt.Will(self.will[0], self.will[1], qos=1, retain=True)
        client = aiomqtt.Client(
            host,
            port,
            identifier=self.client_id,
            username=self.cfg.username,
            password=self.cfg.password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            # A persistent session: the broker keeps our subscriptions and unacknowledged
            # messages across disconnects and gateway restarts.
            clean_session=None if v5 else False,
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
            keepalive=self.cfg.keepalive,
            tls_params=tls_params,
            tls_insecure=self.cfg.tls.insecure if self.cfg.tls else None,
            will=will,
            max_queued_outgoing_messages=self.cfg.max_queued_outgoing,
            timeout=10,
        )
        inner = getattr(client, "_client", None)
        if not isinstance(inner, paho.Client):
            raise RuntimeError("aiomqtt no longer exposes its paho client; pin aiomqtt<3")
        inner.manual_ack_set(True)
        return client

    async def run(
        self,
        on_message: Callable[[Inbound], None],
        on_connect: Callable[[], Awaitable[None]],
    ) -> None:
        """Connect, subscribe and deliver messages forever, reconnecting with backoff and
        jitter. Returns only when cancelled."""
        delay = RECONNECT_MIN_S
        while True:
            client = self._make_client()
            try:
                async with client:
                    self._generation += 1
                    self._client, self._paho = client, client._client
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=1)
                    self.connected.set()
                    self.metrics.inc("mqtt_connects")
                    log.info("mqtt connected", extra={"broker": self._broker_text()})
                    delay = RECONNECT_MIN_S
                    await on_connect()
                    generation = self._generation
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            payload = str(payload).encode() if payload is not None else b""
                        on_message(
                            Inbound(
                                str(message.topic),
                                bytes(payload),
                                message.qos,
                                message.mid,
                                generation,
                            )
                        )
            except aiomqtt.MqttError as exc:
                self.metrics.inc("mqtt_disconnects")
                log.warning(
                    "mqtt connection lost; reconnecting",
                    extra={
                        "broker": self._broker_text(),
                        "error": str(exc),
                        "retry_s": round(delay, 1),
                    },
                )
            finally:
                self.connected.clear()
                self._client, self._paho = None, None
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(RECONNECT_MAX_S, delay * 2)

    def ack(self, msg: Inbound) -> None:
        """Acknowledge a message whose effects are committed. A message from an earlier
        connection is not acknowledged: the broker redelivers it, and applying it twice
        is harmless."""
        if msg.qos == 0 or msg.generation != self._generation or self._paho is None:
            return
        self._paho.ack(msg.mid, msg.qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Hand a message to the connection without waiting for its PUBACK. Returns False
        (and counts it) when it cannot be sent now."""
        client = self._paho
        if client is None:
            self.metrics.inc("publish_dropped_disconnected")
            return False
        info = client.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.metrics.inc(
                "publish_dropped_queue_full" if info.rc == paho.MQTT_ERR_QUEUE_SIZE else "publish_failed"
            )
            return False
        return True

    async def close(self, final: tuple[str, bytes] | None = None) -> None:
        """Publish ``final`` (e.g. the gateway's offline status) and disconnect."""
        client = self._client
        if client is None:
            return
        if final is not None:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.publish(final[0], final[1], qos=1, retain=True, timeout=2)
