"""The gateway's MQTT connection: paho-mqtt with manual acknowledgement and its own
network thread, feeding the asyncio service in batches.

Two deliberate choices, both measured (docs/architecture.md, "MQTT bus"):

* Acknowledge after commit. paho's ``manual_ack`` is on: the PUBACK of a QoS 1 message is
  sent only when the service calls :meth:`MqttBus.ack` after the store commit. Until then
  the broker keeps the message in our persistent session and redelivers it after a crash
  or reconnect. (aiomqtt acknowledges as soon as a message is queued.)
* paho's network thread, not aiomqtt's event-loop integration. With aiomqtt every write
  wakes the loop through a self-pipe and each readable event reads one packet: on this
  project's reference machine a bare aiomqtt consumer peaked at ~1,900 msg/s against
  ~7,800 msg/s for the same consumer on paho's thread (scripts/bench/ingest.py shows the
  gateway figures). The thread parses packets; the loop gets them in batches through
  ``call_soon_threadsafe``; acks and publishes go through paho's thread-safe API.

Reconnects back off exponentially with jitter; the persistent session (MQTT 5 session
expiry, or clean_session=False on 3.1.1) keeps subscriptions and unacknowledged messages.
Outgoing messages are bounded by ``max_queued_outgoing``; one that does not fit is dropped
and counted, and every retained value is republished on reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgetwin.gateway.config import MqttConfig
from edgetwin.gateway.ops.metrics import Metrics
from edgetwin.runtime.aio import wait_within

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
CONNECT_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int  # which connection it came on; acks go only to the same one
    dup: bool = False  # the broker marks this delivery a redelivery (MQTT DUP flag)


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
        self.will = will
        self.connected = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._generation = 0
        self._inbox: collections.deque[Inbound] = collections.deque()
        # Progress, for the health monitor: messages handled; QoS 1 publishes handed to
        # the connection and acknowledged by the broker on it.
        self.handled = 0
        self.published = 0
        self.publish_acks = 0
        self._drain_scheduled = False
        self._on_message: Callable[[Inbound], None] = lambda m: None
        self._session: asyncio.Future[int] | None = None
        self._closing = False
        self._errors_logged = 0
        self._client = self._make_client()

    # ----------------------------------------------------------------- client
    def _make_client(self) -> paho.Client:
        v5 = self.cfg.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            # A persistent session: the broker keeps our subscriptions and unacknowledged
            # messages across disconnects and gateway restarts.
            clean_session=None if v5 else False,
            reconnect_on_failure=False,  # reconnects are ours, with jitter
            manual_ack=True,
        )
        client.enable_logger(logging.getLogger("paho"))
        client.max_inflight_messages_set(self.cfg.max_inflight_outgoing)
        client.max_queued_messages_set(self.cfg.max_queued_outgoing)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.use_tls:
            tls = self.cfg.tls
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls and tls.ca_file else None,
                certfile=str(tls.cert_file) if tls and tls.cert_file else None,
                keyfile=str(tls.key_file) if tls and tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if tls is not None and tls.insecure:
                client.tls_insecure_set(True)
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        return client

    def _connect_properties(self) -> Properties | None:
        if self.cfg.protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = min(self.cfg.session_expiry // 1000, 0xFFFFFFFF)
        props.ReceiveMaximum = self.cfg.receive_maximum
        return props

    # ----------------------------------------------------------------- network thread
    def _handle_connect(self, c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._resolve_session(f"broker refused the connection: {reason}")
            return
        # Bumped here, on the network thread, before any message of this connection is
        # tagged with it (acks of earlier connections' messages are then skipped).
        self._generation += 1
        c.subscribe(list(self.subscriptions))
        self._loop.call_soon_threadsafe(self._connected)

    def _handle_disconnect(self, c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._resolve_session(str(reason))

    def _handle_message(self, c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._inbox.append(
            Inbound(msg.topic, bytes(msg.payload), msg.qos, msg.mid, self._generation, msg.dup)
        )
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon_threadsafe(self._drain)

    def _handle_publish(self, c: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.publish_acks += 1  # an int add on paho's thread: atomic under the GIL

    @property
    def publishes_unacked(self) -> int:
        """QoS 1 publishes on this connection the broker has not acknowledged yet."""
        return max(0, self.published - self.publish_acks)

    @property
    def inbox_waiting(self) -> int:
        return len(self._inbox)

    def _resolve_session(self, why: str) -> None:
        def resolve() -> None:
            if self._session is not None and not self._session.done():
                self._session.set_exception(ConnectionError(why))

        self._loop.call_soon_threadsafe(resolve)

    # ----------------------------------------------------------------- event loop
    def _connected(self) -> None:
        self.published = self.publish_acks = 0  # a new connection: count afresh
        self.connected.set()
        self.metrics.inc("mqtt_connects")

    def _drain(self) -> None:
        self._drain_scheduled = False
        inbox, handle = self._inbox, self._on_message
        while inbox:
            msg = inbox.popleft()
            self.handled += 1
            try:
                handle(msg)
            except Exception as exc:  # the handler should not raise; never strand the rest
                self.metrics.inc("inbound_handler_errors")
                if self._errors_logged < 10:
                    self._errors_logged += 1
                    extra = {"topic": msg.topic[:200]}
                    log.error("inbound message handler raised", extra=extra, exc_info=exc)

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
        client = self._client
        while True:
            self._session = self._loop.create_future()
            try:
                await wait_within(
                    asyncio.to_thread(
                        client.connect,
                        host,
                        port,
                        keepalive=self.cfg.keepalive,
                        clean_start=False if self.cfg.protocol == "5" else paho.MQTT_CLEAN_START_FIRST_ONLY,
                        properties=self._connect_properties(),
                    ),
                    CONNECT_TIMEOUT_S,
                )
                client.loop_start()
                await wait_within(self._wait_connected(), CONNECT_TIMEOUT_S)
                log.info("mqtt connected", extra={"broker": f"{host}:{port}", "protocol": self.cfg.protocol})
                delay = RECONNECT_MIN_S
                await on_connect()
                await self._session  # until the connection is lost
            except asyncio.CancelledError:
                await asyncio.to_thread(self._stop_network)
                raise
            except (OSError, ConnectionError, TimeoutError) as exc:
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
            self.connected.clear()
            await asyncio.to_thread(self._stop_network)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(RECONNECT_MAX_S, delay * 2)

    async def _wait_connected(self) -> None:
        assert self._session is not None
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self.connected.wait())
        session: asyncio.Future[Any] = self._session
        try:
            await asyncio.wait({waiter, session}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._session.done():
            self._session.result()  # raises the reason

    def _stop_network(self) -> None:
        self._client.loop_stop()
        if self._client.is_connected():
            self._client.disconnect()

    def ack(self, msg: Inbound) -> None:
        """Acknowledge a message whose effects are committed. A message from an earlier
        connection is not acknowledged: the broker redelivers it, and applying it twice
        is harmless."""
        if msg.qos == 0 or msg.generation != self._generation or not self.connected.is_set():
            return
        self._client.ack(msg.mid, msg.qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Hand a message to the connection without waiting for its PUBACK. Returns False
        (and counts it) when it cannot be sent now."""
        if not self.connected.is_set():
            self.metrics.inc("publish_dropped_disconnected")
            return False
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            kind = "queue_full" if info.rc == paho.MQTT_ERR_QUEUE_SIZE else "failed"
            self.metrics.inc(f"publish_dropped_{kind}")
            return False
        if qos:
            self.published += 1
        return True

    async def close(self, final: tuple[str, bytes] | None = None) -> None:
        """Publish ``final`` (e.g. the gateway's offline status) and disconnect."""
        self._closing = True
        if final is not None and self.connected.is_set():
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                # Best effort: the will says "offline" anyway if this does not get out.
                with contextlib.suppress(ValueError, RuntimeError):
                    await asyncio.to_thread(info.wait_for_publish, 2.0)
        await asyncio.to_thread(self._stop_network)
