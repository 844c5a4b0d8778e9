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
import gc
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from edgetwin.deviceapi import Device, DeviceModel
from edgetwin.gateway.config import ConfigError, GatewayConfig
from edgetwin.gateway.dedup import RecentUpdates
from edgetwin.gateway.devices import Devices
from edgetwin.gateway.inbound import MqttRouter
from edgetwin.gateway.manifests import load_manifests
from edgetwin.gateway.mapper_host import MapperSet
from edgetwin.gateway.mapper_side import MapperSide
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.mqtt.broker import EmbeddedBroker
from edgetwin.gateway.mqtt.bus import MqttBus
from edgetwin.gateway.ops.health import HealthMonitor, Loop
from edgetwin.gateway.ops.metrics import Metrics
from edgetwin.gateway.release import Release
from edgetwin.gateway.store.batch import snapshot
from edgetwin.gateway.store.schema import StoreError
from edgetwin.gateway.store.writer import Store, StoreWriter
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.twin.writes import WritePolicy
from edgetwin.gateway.write_loop import WriteLoop
from edgetwin.runtime import heap
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
        # What the next commit releases (acknowledgements, answers, deltas, waiters).
        self.release = Release()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.writes = WriteLoop(
            self.engine, self.release, self.metrics, lambda: self.mappers, lambda: self.bus, self._spawn
        )
        self.inbound = MqttRouter(
            self.node, cfg.mqtt, self.engine, self.recent, self.metrics, self.release, self.writes.wake
        )
        self.mapper_host = MapperSide(
            self.engine, self.release, self.metrics, self.inbound.count_report, self.writes.wake
        )
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
            self.mappers = MapperSet(self.mapper_host, self.cfg.mappers)
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
            self._spawn(self.bus.run(self.inbound.on_message, self._on_connect), "mqtt")
            self._spawn(self.writes.run(), "writes")
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
            await self.release.dirty.wait()
            if linger:
                # Gather a little more work per fsync; bounded, so latency stays low.
                await asyncio.sleep(linger)
            await self._commit_once()

    async def _commit_once(self) -> None:
        """Commit what changed, then release what waited on it."""
        async with self._commit_lock:
            await self._commit_locked()

    async def _commit_locked(self) -> None:
        taken = self.release.take()
        changes = self.engine.drain()
        acks, pubs, deltas, retained, waiters = (
            taken.acks,
            taken.pubs,
            taken.deltas,
            taken.retained,
            taken.waiters,
        )
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
                    self.release.changed()
                    self.writes.wake()
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

    # ----------------------------------------------------------------- MQTT inbound
    async def _on_connect(self) -> None:
        assert self.bus is not None
        self.bus.publish(topics.gateway_status(self.node), b"online", 1, True)
        # Subscribers converge after any outage: every retained value is sent again
        # (after the next commit, so nothing uncommitted is shown).
        for dev in self.engine.devices.values():
            self.release.retained.update(
                (dev.id, n) for n, p in dev.properties.items() if p.reported or p.read_error
            )
        self.devices.republish_all()
        self._republish_devices = True
        self.writes.wake()
        self.release.changed()

    def changed(self) -> None:
        """Something changed that the next commit must carry."""
        self.release.changed()

    def writes_wake(self) -> None:
        """A desired write may be due: let the write scheduler look."""
        self.writes.wake()

    # ----------------------------------------------------------------- desired writes
    def _uplink_changed(self) -> None:
        """The uplink changed the engine (an acknowledged outbox entry, a cloud desired
        value): commit it, and let the write scheduler look at new desired values."""
        self.release.changed()
        self.writes.wake()

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
                lambda: self.release.dirty.is_set() or self._commit_lock.locked(),
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
