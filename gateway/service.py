"""The gateway service: the asyncio shell around the twin engine.

Flow of a reported value: MQTT message (or a mapper's report) -> engine applies it in
memory -> the committer writes everything that changed since its last commit in one
durable transaction (group commit) -> only then are retained values, answers and deltas
published, then the MQTT messages acknowledged, and mapper reports released. A crash at
any point before the acknowledgement loses nothing: the broker redelivers what was not
acknowledged, and mappers read again.

Bounds: in-flight MQTT messages are bounded by the session's Receive Maximum (MQTT 5) or
the broker's max_inflight_messages; outgoing messages by ``mqtt.max_queued_outgoing``;
the store by the devices defined plus ``store.events_max`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgetwin.deviceapi import Device, DeviceModel, value_to_text
from edgetwin.gateway.config import ConfigError, GatewayConfig
from edgetwin.gateway.dedup import RecentUpdates
from edgetwin.gateway.devices import Devices
from edgetwin.gateway.manifests import load_manifests
from edgetwin.gateway.mapper_host import MapperSet
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.mqtt.broker import EmbeddedBroker
from edgetwin.gateway.mqtt.bus import Inbound, MqttBus
from edgetwin.gateway.mqtt.payloads import PayloadError
from edgetwin.gateway.ops.health import HealthMonitor, Loop
from edgetwin.gateway.ops.metrics import Metrics
from edgetwin.gateway.store.batch import snapshot
from edgetwin.gateway.store.schema import StoreError
from edgetwin.gateway.store.writer import Store, StoreWriter
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.twin.model import DesiredRejected, ReportOutcome, TwinError, UnknownDevice, clip
from edgetwin.gateway.twin.writes import WritePolicy
from edgetwin.mappers.sdk import DeviceUnavailable, MapperError, ReportResult
from edgetwin.runtime import heap, logs
from edgetwin.runtime.aio import cancel_tasks, wait_within
from edgetwin.runtime.sd_notify import Notifier
from edgetwin.runtime.version import __version__

if TYPE_CHECKING:
    from edgetwin.gateway.ops.prom import GatewayMetrics

log = logging.getLogger(__name__)

METRICS_INTERVAL_S = 1.0
# How long stopping may wait for the mappers and for each group of tasks to end.
SHUTDOWN_GRACE_S = 10.0
# Skipped polling cycles: a log warning at most this often per device, an event less.
SKIP_WARN_INTERVAL_S = 60.0
SKIP_EVENT_INTERVAL_S = 600.0


@dataclass
class _SkipCount:
    for_log: int = 0
    for_event: int = 0
    logged_at: float = float("-inf")
    evented_at: float = float("-inf")


# Store meta key: the last resourceVersion seen of each kind from the cloud (JSON).
UPLINK_RESUME_KEY = "uplink.resume"


def now_ms() -> int:
    return int(time.time() * 1000)


class Gateway:
    """One gateway process. ``await Gateway(cfg).run(stop_event)``."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.node = cfg.node
        self.metrics = Metrics()
        writes = cfg.writes
        self.engine = TwinEngine(
            jitter=random.random,
            writes=WritePolicy(writes.attempts, writes.retry_min, writes.retry_max),
        )
        self.store: Store | None = None
        self.writer: StoreWriter | None = None
        self.bus: MqttBus | None = None
        self.mappers: MapperSet | None = None
        self.uplink: Any = None  # gateway.uplink.Uplink when uplink: is configured
        # The devices served and where their definitions come from (manifests, cluster).
        self.devices = Devices(self)
        self.store_id = ""
        # Twin updates applied lately, so a redelivery is answered, not applied again.
        self.recent = RecentUpdates(max(2048, 2 * cfg.mqtt.receive_maximum))
        self.ready = asyncio.Event()
        # Set once run() begins to stop (asked to, or a store failure): the caller may
        # bound how long the rest takes (edgetwin.cli does).
        self.stopping = asyncio.Event()
        # Everything below is released by the next commit.
        self._acks: list[Inbound] = []
        self._pubs: list[tuple[str, bytes, int, bool]] = []
        # Deltas for external mappers: (device, properties, topic, body). One that cannot
        # be handed to the broker gives its attempts back (TwinEngine.write_undelivered).
        self._deltas: list[tuple[str, list[str], str, bytes]] = []
        self._retained: set[tuple[str, str]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._dirty = asyncio.Event()
        self._writes_wake = asyncio.Event()
        self._writing: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ratelimit = logs.RateLimit()
        self._skipped: dict[str, _SkipCount] = {}
        self._broker_dropped_seen: int | None = None
        self._republish_devices = False
        # One commit at a time: the committer and the final commit at shutdown share the
        # store's one connection.
        self._commit_lock = asyncio.Lock()
        self._commits_done = 0
        # Prometheus and its HTTP server only when asked for: aiohttp and
        # prometheus_client cost ~20 MB of RSS in a gateway that does not serve them.
        self.prom: GatewayMetrics | None = None
        self.health = HealthMonitor(self._health_loops(), cfg.health.stuck_after / 1000)
        self.notifier = Notifier()

    # ----------------------------------------------------------------- start-up
    def load(self) -> None:
        """Open the store, load manifests and the cluster's definitions kept in the store,
        restore twins and commit the result."""
        cfg = self.cfg
        self.store = Store(cfg.store.path, cfg.store.events_max)
        owner = self.store.get_meta("node")
        if owner is not None and owner != self.node:
            raise ConfigError("store.path", f"{cfg.store.path} belongs to node {owner!r}, not {self.node!r}")
        self.store_id = self.store.get_meta("store_id") or ""
        manifests = load_manifests(cfg.manifests, self.node)
        decision = self.devices.load(list(manifests.devices.values()), list(manifests.models.values()))
        self.store.load_into(self.engine)
        self.recent.restore(self.store.load_recent(self.recent.capacity))
        self.store.prune(self.engine)
        self.engine.seed_revisions(now_ms() * 1000)
        for stale in self.store.stored_device_ids() - set(self.engine.devices):
            self.engine.changes.removed.add(stale)
        self.devices.finish_load(decision)
        objects: list[Device | DeviceModel] = [*manifests.models.values(), *manifests.devices.values()]
        rows: list[tuple[str, str, str, str | None, str]] = [
            (obj.kind, obj.metadata.namespace, obj.metadata.name, None, obj.model_dump_json())
            for obj in objects
        ]
        self.store.save_objects(rows, "manifest")
        self.store.set_meta("node", self.node)
        batch = snapshot(self.engine, self.engine.drain())
        batch.objects, batch.objects_deleted, batch.served, batch.unserved = self.devices.take_rows()
        self.store.commit(batch)
        sources = [d.source for d in self.devices.registry.served.values()]
        log.info(
            "gateway loaded",
            extra={
                "node": self.node,
                "devices": len(sources),
                "from_manifests": sources.count("manifest"),
                "from_cluster": sources.count("cluster"),
                "store": str(cfg.store.path),
            },
        )

    # ----------------------------------------------------------------- running
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises on a store failure (the process should exit
        and be restarted: nothing unacknowledged is lost)."""
        broker = None
        ops: Any = None  # deviceapi.ops_http.OpsServer when health.listen is set
        if self.cfg.mqtt.embedded is not None:
            broker = EmbeddedBroker(self.cfg.mqtt.embedded.host, self.cfg.mqtt.embedded.port)
            await broker.start()
        try:
            self.mappers = MapperSet(_Host(self), self.cfg.mappers)
            self.load()
            assert self.store is not None
            self.writer = StoreWriter(self.store, self.cfg.store.commit_mode)
            self.bus = MqttBus(
                self.cfg.mqtt,
                self.cfg.mqtt.client_id or f"edgetwin-{self.node}",
                topics.subscriptions(self.node),
                self.metrics,
                will=(topics.gateway_status(self.node), b"offline"),
            )
            committer = self._spawn(self._committer(), "committer")
            self._spawn(self.devices.run_mapper_changes(), "mapper changes")
            self._spawn(self.bus.run(self._on_message, self._on_connect), "mqtt")
            self._spawn(self._write_scheduler(), "writes")
            self._spawn(self._metrics_publisher(), "metrics")
            self._spawn(self._health_watch(), "health")
            if heap.available():
                self._spawn(self._heap_trimmer(), "heap")
            if self.cfg.health.listen:
                from edgetwin.gateway.ops.prom import GatewayMetrics
                from edgetwin.runtime.ops_http import OpsServer, split_listen

                self.prom = GatewayMetrics(self)
                ops = OpsServer(self.health.problems, self.prom.registry)
                await ops.start(*split_listen(self.cfg.health.listen))
                log.info("health and metrics", extra={"url": f"http://{self.cfg.health.listen}/healthz"})
            if self.cfg.uplink is not None:
                from edgetwin.gateway.uplink import Uplink

                assert self.store is not None
                saved = self.store.get_meta(UPLINK_RESUME_KEY)
                resume = json.loads(saved) if saved else {}
                self.uplink = Uplink(
                    self.cfg.uplink,
                    self.engine,
                    self._uplink_changed,
                    self.devices.on_cloud,
                    resume,
                    self.store_id,
                    __version__,
                    self.devices.counts,
                )
                self._spawn(self.uplink.run(), "uplink")
            await self.mappers.start(self.devices.served())
            # Start-up objects (manifests, twins) live for the whole run: keep them out
            # of the cyclic collector's full passes, which otherwise stall the loop.
            gc.collect()
            gc.freeze()
            self.ready.set()
            self.notifier.send("READY=1")
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({stopper, committer}, return_when=asyncio.FIRST_COMPLETED)
            self.stopping.set()
            stopper.cancel()
            if committer.done() and committer.exception() is not None:
                raise committer.exception()  # type: ignore[misc]
            self.notifier.send("STOPPING=1")
            await self._shutdown()
        finally:
            self.stopping.set()
            if ops is not None:
                await ops.stop()
            self.notifier.close()
            if self.mappers is not None:  # already stopped on a clean stop; not after a failure
                try:
                    await wait_within(self.mappers.stop(), SHUTDOWN_GRACE_S)
                except TimeoutError:
                    log.error("mappers did not stop in time", extra={"grace_s": SHUTDOWN_GRACE_S})
            stuck = await cancel_tasks(list(self._tasks), SHUTDOWN_GRACE_S)
            if stuck:  # the process still ends: edgetwin.cli bounds what follows
                log.error("tasks did not stop in time", extra={"tasks": ",".join(sorted(stuck))})
            if self.writer is not None:
                self.writer.close()
            if self.store is not None:
                self.store.close()
            if broker is not None:
                await broker.stop()

    async def _shutdown(self) -> None:
        if self.mappers is not None:
            await self.mappers.stop()
        await self._commit_once()
        if self.bus is not None:
            await self.bus.close(final=(topics.gateway_status(self.node), b"offline"))
        log.info("gateway stopped", extra={"counters": json.dumps(self.metrics.snapshot())})

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----------------------------------------------------------------- commit
    async def _committer(self) -> None:
        linger = self.cfg.store.commit_linger_ms / 1000
        while True:
            await self._dirty.wait()
            if linger:
                # Gather a little more work per fsync; bounded, so latency stays low.
                await asyncio.sleep(linger)
            await self._commit_once()

    async def _commit_once(self) -> None:
        """Commit what changed, then release what waited on it."""
        async with self._commit_lock:
            await self._commit_locked()

    async def _commit_locked(self) -> None:
        self._dirty.clear()
        changes = self.engine.drain()
        acks, self._acks = self._acks, []
        pubs, self._pubs = self._pubs, []
        deltas, self._deltas = self._deltas, []
        retained, self._retained = self._retained, set()
        waiters, self._waiters = self._waiters, []
        resume = self.uplink.take_resume() if self.uplink is not None else None
        recent, recent_floor = self.recent.take_added()
        objects, objects_deleted, served, unserved = self.devices.take_rows()
        if changes or resume is not None or recent or objects or objects_deleted or served or unserved:
            assert self.writer is not None
            started = time.perf_counter()
            batch = snapshot(self.engine, changes)
            batch.recent, batch.recent_floor = recent, recent_floor
            batch.objects, batch.objects_deleted, batch.served, batch.unserved = (
                objects,
                objects_deleted,
                served,
                unserved,
            )
            if resume is not None:  # the cloud's resourceVersions, with what they brought
                batch.meta.append((UPLINK_RESUME_KEY, resume))
            try:
                await self.writer.commit(batch)
            except StoreError:
                log.critical("store write failed; stopping so nothing unacknowledged is lost")
                for w in waiters:
                    w.cancel()
                raise
            self.metrics.inc("commits")
            for ev in changes.events:
                if ev.kind in ("rejected", "read_error"):  # already limited per property
                    log.warning(
                        "property read error" if ev.kind == "read_error" else "rejected values",
                        extra={
                            "device": ev.device_id,
                            "property": ev.property,
                            "detail": json.dumps(ev.detail),
                        },
                    )
            if self.store is not None and self.store.events_dropped:
                # The event log's bound: oldest rows dropped so far (a running total).
                self.metrics.total("events_dropped", self.store.events_dropped)
            took = time.perf_counter() - started
            self.metrics.peak("commit_ms_max", took * 1000)
            if self.prom is not None:
                self.prom.commit_seconds.observe(took)
            self.metrics.peak("commit_batch_max", len(acks))
        bus = self.bus
        if bus is not None:
            # Results go out before the acknowledgements, on the same connection: a crash
            # in between leaves the message unacknowledged, so it is redelivered and
            # answered again, never acknowledged without an answer.
            self._publish_values(bus, retained | changes.public)
            for topic, payload, qos, retain in pubs:
                bus.publish(topic, payload, qos, retain)
            republish, self._republish_devices = self._republish_devices, False
            self.devices.publish(bus.publish, set(self.engine.devices) if republish else changes.devices)
            for dev_id, props, topic, payload in deltas:
                if bus.publish(topic, payload, 1, False):
                    self.metrics.inc("deltas_sent")
                else:  # the broker is gone: that attempt never happened
                    for prop in props:
                        self.engine.write_undelivered(
                            dev_id, prop, now_ms(), "the MQTT broker is not connected"
                        )
                    self._dirty.set()
                    self._writes_wake.set()
            for msg in acks:
                bus.ack(msg)
        for w in waiters:
            if not w.done():
                w.set_result(None)
        self._commits_done += 1
        if changes:
            self.metrics.peak("commit_cycle_ms_max", (time.perf_counter() - started) * 1000)

    def _publish_values(self, bus: MqttBus, changed: set[tuple[str, str]]) -> None:
        """Retained values of what changed, per property and/or per device (mqtt.values)."""
        mode = self.cfg.mqtt.values
        devices = self.engine.devices
        if mode != "per_device":
            for dev_id, prop in changed:
                dev = devices.get(dev_id)
                twin = dev.properties.get(prop) if dev is not None else None
                if dev is not None and twin is not None and (twin.reported or twin.read_error):
                    topic = topics.property_value(self.node, dev.namespace, dev.name, prop)
                    bus.publish(topic, payloads.property_value(twin), 1, True)
        if mode != "per_property":
            for dev_id in {dev_id for dev_id, _ in changed}:
                dev = devices.get(dev_id)
                if dev is not None:
                    topic = topics.device_values(self.node, dev.namespace, dev.name)
                    bus.publish(topic, payloads.device_values(dev.properties.values()), 1, True)

    def _committed(self) -> asyncio.Future[None]:
        """A future resolved by the commit that includes everything done so far."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._dirty.set()
        return fut

    # ----------------------------------------------------------------- MQTT inbound
    async def _on_connect(self) -> None:
        assert self.bus is not None
        self.bus.publish(topics.gateway_status(self.node), b"online", 1, True)
        # Subscribers converge after any outage: every retained value is sent again
        # (after the next commit, so nothing uncommitted is shown).
        for dev in self.engine.devices.values():
            self._retained.update(
                (dev.id, n) for n, p in dev.properties.items() if p.reported or p.read_error
            )
        self.devices.republish_all()
        self._republish_devices = True
        self._writes_wake.set()
        self._dirty.set()

    def _on_message(self, msg: Inbound) -> None:
        """Handle one inbound message. Never raises: whatever a peer sends, the message
        is answered (where it can be), counted and acknowledged after the next commit,
        so nothing can wedge the session as a poison message."""
        try:
            self._route(msg)
        except Exception as exc:
            # A bug of ours triggered by this input. Refuse it like bad input: counted,
            # logged (rate-limited, with the traceback), answered and acknowledged.
            if self._ratelimit.allow("internal"):
                log.error(
                    "message handling failed; message refused",
                    extra={"topic": msg.topic[:200], "bytes": len(msg.payload)},
                    exc_info=exc,
                )
            if not any(m is msg for m in self._acks):  # never acknowledge one message twice
                reason = f"the gateway could not process this message ({type(exc).__name__})"
                self._reject(msg, "internal", reason)

    def _route(self, msg: Inbound) -> None:
        if msg.topic == topics.BROKER_DROPPED:
            self._broker_dropped(msg.payload)
            return
        if msg.topic == topics.membership_get(self.node):
            event_id = payloads.parse_twin_get(msg.payload, self.cfg.mqtt.max_payload)
            served = [d for d in self.engine.devices.values() if d.served]
            body = payloads.membership_get_result(event_id, now_ms(), served)
            self._pubs.append((topics.membership_get_result(self.node), body, 1, False))
            self._ack_now(msg)
            return
        route = topics.parse_inbound(msg.topic)
        if route is None:
            self.metrics.inc("rejected_unknown_topic")
            self._ack_now(msg)
            return
        dev = self.engine.devices.get(route.device_id)
        if dev is None:
            self._reject(
                msg,
                "unknown_device",
                f"device {clip(route.device_id, 100)!r} is not defined for node {self.node!r}",
            )
            return
        if not dev.served:
            ready = dev.conditions.get("Ready") or {}
            reason = (
                f"device {route.device_id!r} is not served: {ready.get('message', 'no valid definition')}"
            )
            self._reject(msg, "not_served", reason)
            return
        try:
            if route.action == topics.TWIN_UPDATE:
                self._twin_update(msg, route.device_id)
            elif route.action == topics.TWIN_GET:
                self._twin_get(msg, route.device_id)
            else:
                self._state_update(msg, route.device_id)
        except PayloadError as exc:
            self._reject(msg, exc.kind, exc.reason)
        except TwinError as exc:
            self._reject(msg, "bad_value", str(exc))

    def _broker_dropped(self, payload: bytes) -> None:
        """mosquitto's count of messages it dropped since it started. A rise means the
        broker lost messages it had acknowledged to their publishers (a session queue
        was full: max_queued_messages / max_queued_bytes): counted (metric
        broker_messages_dropped, the broker's total) and warned about."""
        try:
            total = int(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return
        seen = self._broker_dropped_seen
        self._broker_dropped_seen = total
        self.metrics.total("broker_messages_dropped", total)
        if seen is not None and total > seen and self._ratelimit.allow("broker_dropped"):
            log.warning(
                "the MQTT broker dropped messages it had acknowledged to their publishers (a "
                "client's queue was full; for the gateway's session these are lost updates); raise "
                "its max_queued_messages / max_queued_bytes (docs/mqtt.md, 'Broker settings')",
                extra={"dropped": total - seen, "broker_total": total},
            )
        elif seen is None and total > 0:
            log.warning(
                "the MQTT broker reports messages dropped before the gateway connected",
                extra={"broker_total": total},
            )

    def changed(self) -> None:
        """Something changed that the next commit must carry."""
        self._dirty.set()

    def writes_wake(self) -> None:
        """A desired write may be due: let the write scheduler look."""
        self._writes_wake.set()

    def _ack_now(self, msg: Inbound) -> None:
        # Nothing of this message is stored, but it is still acknowledged in order with
        # the rest, after the next commit.
        self._acks.append(msg)
        self._dirty.set()

    def _reject(self, msg: Inbound, kind: str, reason: str) -> None:
        """Count and log a refused message on one of our inbound topics, answer it on
        ``{topic}/result`` (unless oversize: the payload is not echoed) and acknowledge."""
        self.metrics.inc(f"rejected_{kind}")
        if self._ratelimit.allow(kind):
            log.warning("rejected MQTT message", extra={"topic": msg.topic, "kind": kind, "reason": reason})
        if len(msg.payload) <= self.cfg.mqtt.max_payload:
            code = {"unknown_device": 404, "not_served": 409}.get(kind, 400)
            body = payloads.error_result(payloads.event_id_of(msg.payload), now_ms(), code, reason)
            self._pubs.append((f"{msg.topic}/result", body, 1, False))
        self._ack_now(msg)

    def _twin_update(self, msg: Inbound, dev_id: str) -> None:
        upd = payloads.parse_twin_update(msg.payload, self.cfg.mqtt.max_payload)
        now = now_ms()
        key = self.recent.key(dev_id, upd.event_id, msg.payload)
        seen = self.recent.lookup(key, now, msg.dup)
        if seen is not None:  # applied before (a redelivery): answer again, apply nothing
            self.metrics.inc("duplicates")
            body = seen.answer or payloads.duplicate_result(upd.event_id, now)
            self._pubs.append((topics.twin_update_result(dev_id), body, self.cfg.mqtt.result_qos, False))
            self._ack_now(msg)
            return
        engine = self.engine
        outcome = (
            engine.apply_reported(dev_id, upd.actual, now, upd.timestamp)
            if upd.actual
            else ReportOutcome({}, {})
        )
        desired_info: dict[str, dict[str, Any]] = {}
        for prop, raw in upd.expected.items():
            try:
                d = engine.apply_desired(dev_id, prop, raw, "edge", now)
            except DesiredRejected as exc:
                outcome.rejected[prop] = exc.reason
                continue
            desired_info[prop] = {
                "value": value_to_text(d.desired.value),
                "metadata": {
                    "origin": d.desired.origin,
                    "stamp": str(d.desired.stamp),
                    "accepted": d.won,
                },
            }
            if d.write_pending:
                self._writes_wake.set()
        self._count_report(dev_id, outcome)
        dev = engine.devices[dev_id]
        body = payloads.update_result(
            upd.event_id, now, dev, outcome.accepted, outcome.rejected, desired_info
        )
        self._pubs.append((topics.twin_update_result(dev_id), body, self.cfg.mqtt.result_qos, False))
        self.recent.remember(key, body, now)
        self._acks.append(msg)
        self._dirty.set()

    def _count_report(self, dev_id: str, outcome: ReportOutcome) -> None:
        if outcome.accepted:
            self.metrics.inc("reported_accepted", len(outcome.accepted))
        if outcome.rejected:
            # Logged with the engine's events (once per change per property), not here.
            self.metrics.inc("rejected_values", len(outcome.rejected))

    def _twin_get(self, msg: Inbound, dev_id: str) -> None:
        event_id = payloads.parse_twin_get(msg.payload, self.cfg.mqtt.max_payload)
        body = payloads.get_result(event_id, now_ms(), self.engine.devices[dev_id])
        self._pubs.append((topics.twin_get_result(dev_id), body, 1, False))
        self._ack_now(msg)

    def _state_update(self, msg: Inbound, dev_id: str) -> None:
        event_id, state = payloads.parse_state_update(msg.payload, self.cfg.mqtt.max_payload)
        self.engine.set_state(dev_id, state, now_ms())
        body = payloads.state_result(event_id, now_ms(), self.engine.devices[dev_id])
        self._pubs.append((topics.state_update_result(dev_id), body, 1, False))
        self._acks.append(msg)
        self._dirty.set()
        self._writes_wake.set()  # a device back online resumes its paused writes

    # ----------------------------------------------------------------- mapper side
    async def report(self, dev_id: str, values: Mapping[str, Any], timestamp_ms: int | None) -> ReportResult:
        outcome = self.engine.apply_reported(dev_id, values, now_ms(), timestamp_ms)
        self._count_report(dev_id, outcome)
        await self._committed()
        return ReportResult({n: r.version for n, r in outcome.accepted.items()}, outcome.rejected)

    async def set_state(self, dev_id: str, state: str) -> None:
        self.engine.set_state(dev_id, state, now_ms())
        self._writes_wake.set()  # a device back online resumes its paused writes
        await self._committed()

    async def report_errors(self, dev_id: str, errors: Mapping[str, str]) -> None:
        self.engine.set_read_errors(dev_id, errors, now_ms())
        await self._committed()

    def cycles_skipped(self, dev_id: str, skipped: int, cycle_ms: int) -> None:
        """A mapper's polling loop overran its collectCycle: count the cycles it skipped
        (metric ``cycles_skipped``), warn at most once a minute per device and note it
        in the event log at most every 10 minutes, each with the count since."""
        self.metrics.inc("cycles_skipped", skipped)
        acc = self._skipped.setdefault(dev_id, _SkipCount())
        acc.for_log += skipped
        acc.for_event += skipped
        now = time.monotonic()
        if now - acc.logged_at >= SKIP_WARN_INTERVAL_S:
            log.warning(
                "polling cycles skipped: reads take longer than the collectCycle "
                "(docs/mappers/modbus.md, 'Skipped cycles')",
                extra={"device": dev_id, "skipped": acc.for_log, "cycle_ms": cycle_ms},
            )
            acc.for_log, acc.logged_at = 0, now
        if now - acc.evented_at >= SKIP_EVENT_INTERVAL_S and dev_id in self.engine.devices:
            detail = {"skipped": acc.for_event, "cycle_ms": cycle_ms}
            self.engine.record_event(now_ms(), dev_id, "", "cycles_skipped", detail)
            acc.for_event, acc.evented_at = 0, now
            self._dirty.set()

    # ----------------------------------------------------------------- desired writes
    def _uplink_changed(self) -> None:
        """The uplink changed the engine (an acknowledged outbox entry, a cloud desired
        value): commit it, and let the write scheduler look at new desired values."""
        self._dirty.set()
        self._writes_wake.set()

    def _deliverable(self, dev_id: str) -> bool:
        """Whether a desired write could reach the device now: it is not reported
        offline, and its in-process mapper serves it or the broker is connected (for
        external mappers). Writes to a device that cannot be reached wait, unspent."""
        dev = self.engine.devices.get(dev_id)
        if dev is None or dev.state == "offline":
            return False
        if self.mappers is not None and dev_id in self.mappers.by_device:
            return True
        return self.bus is not None and self.bus.connected.is_set()

    async def _write_scheduler(self) -> None:
        """Hand due desired writes to the device's mapper, or to external mappers as a
        delta on MQTT, with the engine's backoff between attempts. The schedule of a
        device that cannot be reached is paused (woken when it comes back)."""
        while True:
            due = self.engine.due_writes(now_ms(), self._deliverable)
            external: dict[str, list[str]] = {}
            for req in due:
                mapper = self.mappers.by_device.get(req.device_id) if self.mappers else None
                if mapper is None:
                    external.setdefault(req.device_id, []).append(req.property)
                elif (req.device_id, req.property) not in self._writing:
                    self._spawn(self._mapper_write(req.device_id, req.property, req.value), "write")
                else:  # the previous attempt is still running: this one is not spent
                    self.engine.write_undelivered(req.device_id, req.property, now_ms())
            for dev_id, props in external.items():
                dev = self.engine.devices[dev_id]
                body = payloads.delta(now_ms(), dev, self.engine.deltas(dev_id))
                self._deltas.append((dev_id, props, topics.twin_update_delta(dev_id), body))
            if due:
                self._dirty.set()
            next_due = self.engine.next_write_due(self._deliverable)
            timeout = None if next_due is None else max(0.0, (next_due - now_ms()) / 1000)
            self._writes_wake.clear()
            with contextlib.suppress(TimeoutError):
                await wait_within(self._writes_wake.wait(), timeout)

    async def _mapper_write(self, dev_id: str, prop: str, value: Any) -> None:
        assert self.mappers is not None
        key = (dev_id, prop)
        self._writing.add(key)
        try:
            await self._committed()  # the desired value is durable before we act on it
            await self.mappers.by_device[dev_id].write(self.mappers.bindings[dev_id], prop, value)
            self.metrics.inc("mapper_writes")
        except DeviceUnavailable as exc:
            # The device could not be reached: not an attempt. Retried once it is back.
            self.metrics.inc("mapper_writes_undelivered")
            self.engine.write_undelivered(dev_id, prop, now_ms(), str(exc) or "device unavailable")
            self._dirty.set()
        except Exception as exc:
            # A mapper's own failure (MapperError, I/O) or a bug in a third-party
            # plugin: either way the attempt failed, the reason is kept, retries go on.
            self.metrics.inc("mapper_write_errors")
            if not isinstance(exc, MapperError | OSError | TimeoutError):
                log.error("mapper write raised", extra={"device": dev_id, "property": prop}, exc_info=exc)
            self.engine.write_failed(dev_id, prop, str(exc) or type(exc).__name__)
            self._dirty.set()
        finally:
            self._writing.discard(key)
            self._writes_wake.set()

    # ----------------------------------------------------------------- metrics
    def _health_loops(self) -> list[Loop]:
        def uplink_unacked() -> bool:
            return self.uplink is not None and self.uplink.frames_unacked > 0

        def bus_pending() -> bool:
            bus = self.bus
            return bus is not None and (
                bus.inbox_waiting > 0 or (bus.connected.is_set() and bus.publishes_unacked > 0)
            )

        return [
            Loop(
                "committer",
                lambda: self._dirty.is_set() or self._commit_lock.locked(),
                lambda: self._commits_done,
                "changes waiting for a commit",
            ),
            Loop(
                "mqtt",
                bus_pending,
                lambda: (self.bus.handled + self.bus.publish_acks) if self.bus is not None else 0,
                "messages received but not handled, or publishes the broker does not acknowledge",
            ),
            Loop(
                "uplink",
                uplink_unacked,
                lambda: self.uplink.frames_acked if self.uplink is not None else 0,
                "frames the relay does not acknowledge",
            ),
        ]

    async def _health_watch(self) -> None:
        """Sample the loops every second; feed systemd's watchdog while none is stuck."""
        interval = self.notifier.watchdog_interval_s
        next_ping = 0.0
        was: set[str] = set()
        while True:
            await asyncio.sleep(1.0)
            self.health.sample()
            problems = self.health.problems()
            stuck = {p.split(" ", 1)[0] for p in problems}  # the loops, not their growing ages
            if stuck != was:  # logged once per change, not every second
                if problems:
                    log.error("gateway unhealthy", extra={"problems": json.dumps(problems)})
                elif was:
                    log.info("gateway healthy again")
                was = stuck
            if interval is not None and not problems and time.monotonic() >= next_ping:
                self.notifier.send("WATCHDOG=1")
                next_ping = time.monotonic() + interval

    async def _heap_trimmer(self) -> None:
        """Give freed heap back to the OS now and then (see gateway.heap)."""
        while True:
            await asyncio.sleep(heap.TRIM_EVERY_S)
            heap.trim()

    async def _metrics_publisher(self) -> None:
        while True:
            await asyncio.sleep(METRICS_INTERVAL_S)
            self.metrics.total("tasks", len(asyncio.all_tasks()))  # bounded: a leak shows here
            if self.metrics.changed and self.bus is not None and self.bus.connected.is_set():
                self.metrics.changed = False
                body = json.dumps(self.metrics.snapshot(reset_peaks=True)).encode()
                self.bus.publish(topics.gateway_metrics(self.node), body, 1, True)


class _Host:
    """The :class:`mappers.sdk.MapperHost` the gateway gives its mappers."""

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway

    async def report(
        self, device_id: str, values: Mapping[str, Any], timestamp_ms: int | None = None
    ) -> ReportResult:
        try:
            return await self._gw.report(device_id, values, timestamp_ms)
        except UnknownDevice as exc:
            raise MapperError(str(exc)) from None

    async def set_state(self, device_id: str, state: str) -> None:
        await self._gw.set_state(device_id, state)

    async def report_errors(self, device_id: str, errors: Mapping[str, str]) -> None:
        await self._gw.report_errors(device_id, errors)

    def cycles_skipped(self, device_id: str, skipped: int, cycle_ms: int) -> None:
        self._gw.cycles_skipped(device_id, skipped, cycle_ms)
