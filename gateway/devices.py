"""The devices a gateway serves, over their lifetime: defined by local manifests and by
the cluster (through the uplink), decided by :mod:`gateway.registry`, and applied here
to the twin engine, the mappers, the store and MQTT.

* A definition to serve: its twin is defined (kept state of properties that remain),
  its spec's desired values applied (only values that changed since the last one seen
  count as new cloud writes: that record is persisted with the twin), its mapper starts
  or reconfigures that one device, and it is kept in the store (``served``) so a gateway
  restarted offline serves exactly what it served before.
* A device no longer defined anywhere: its mapper stops serving it, its twin, outbox
  entry and retained MQTT topics go, an event records it.
* Readiness: a ``Ready`` condition in Device status (``Ready=False`` names the problem),
  ``LocalManifest`` where the cluster overrides a local manifest, and
  ``observedGeneration`` (with the store's id) so the relay knows what the edge has.
* MQTT: ``edgetwin/{node}/devices`` (retained list), per device ``.../_state``
  (retained state and conditions) and ``.../_spec`` (retained definition), and
  KubeEdge's ``$hw/events/node/{node}/membership/updated`` and ``.../membership/get``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Protocol

from pydantic import ValidationError

from edgetwin.deviceapi import Device, DeviceModel
from edgetwin.gateway.config import GatewayConfig
from edgetwin.gateway.dedup import RecentUpdates
from edgetwin.gateway.mapper_host import MapperSet
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.registry import Decision, Definition, Registry, Source
from edgetwin.gateway.store.writer import Store
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.twin.hlc import Stamp


class DevicesHost(Protocol):
    """What :class:`Devices` uses of the gateway that owns it (gateway.service)."""

    cfg: GatewayConfig
    node: str
    engine: TwinEngine
    recent: RecentUpdates
    store: Store | None
    store_id: str
    mappers: MapperSet | None
    uplink: Any  # gateway.uplink.Uplink, loaded only with an uplink

    def changed(self) -> None: ...

    def writes_wake(self) -> None: ...


log = logging.getLogger(__name__)


def cloud_stamp(meta: dict[str, Any]) -> Stamp | None:
    """When the Device's spec was last written in the cloud: the newest
    ``metadata.managedFields[].time`` outside the status subresource (kube-apiserver
    keeps these, to the second). The conflict rule compares it with edge stamps."""
    from datetime import UTC, datetime

    latest: int | None = None
    fields = meta.get("managedFields")
    for entry in fields if isinstance(fields, list) else []:
        if not isinstance(entry, dict) or entry.get("subresource") or not entry.get("time"):
            continue
        try:
            when = datetime.strptime(str(entry["time"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            continue
        ms = int(when.timestamp() * 1000)
        latest = ms if latest is None else max(latest, ms)
    return None if latest is None else Stamp(latest)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Devices:
    """The device lifecycle of one gateway (see the module docstring)."""

    def __init__(self, gw: DevicesHost) -> None:
        self.gw = gw
        self.registry = Registry(gw.node, self._check, self._serves)
        # Waiting for the next commit: cluster objects to keep (or drop), served rows.
        self._objects: dict[tuple[str, str, str], tuple[str, str] | None] = {}
        self._served: dict[str, tuple[str, int, str, str, str] | None] = {}
        # Waiting to be published after the next commit.
        self._spec_topics: set[str] = set()
        self._cleared: list[tuple[str, str, list[str]]] = []  # (namespace, name, properties)
        self._added: list[str] = []
        self._removed: list[tuple[str, str]] = []
        self._list_dirty = False
        self._mapper_changes: asyncio.Queue[tuple[list[tuple[Device, DeviceModel]], list[str]]] = (
            asyncio.Queue()
        )

    # ----------------------------------------------------------------- checks
    def _serves(self, protocol: str) -> bool:
        mappers = self.gw.mappers
        installed = mappers.serves(protocol) if mappers is not None else _installed(protocol)
        return installed or protocol in self.gw.cfg.external_protocols

    def _check(self, device: Device, model: DeviceModel) -> tuple[str, str] | None:
        """A mapper's own validation of a device (protocol and visitor config)."""
        from edgetwin.gateway.mapper_host import binding, discover

        protocol = device.spec.protocol
        if protocol is None:
            return None
        available = self.gw.mappers.available if self.gw.mappers is not None else discover()
        cls = available.get(protocol.protocolName)
        if cls is None:
            return None  # left to external mappers (readiness says whether one is expected)
        try:
            cls.validate(binding(device, model))
        except ValueError as exc:
            return "InvalidConfig", _spec_path(device, str(exc))
        return None

    # ----------------------------------------------------------------- start-up
    def load(self, manifest_devices: list[Device], manifest_models: list[DeviceModel]) -> Decision:
        """At start: manifests, plus the cluster objects and served definitions kept in
        the store. Defines every twin (the store's twin rows are loaded afterwards)."""
        store = self.gw.store
        assert store is not None
        self.registry.set_manifests(manifest_devices, manifest_models)
        cluster = [obj for _, obj in store.load_objects("cluster") if isinstance(obj, dict)]
        served = []
        for dev_id, source, generation, rv, device, model in store.load_served():
            try:
                served.append(
                    Definition(
                        Device.model_validate(device),
                        DeviceModel.model_validate(model),
                        _source(source),
                        generation,
                        rv,
                    )
                )
            except ValidationError:
                log.warning("a stored definition no longer loads; decided again", extra={"device": dev_id})
        self.registry.restore(self._split_models(cluster), served)
        decision = self.registry.decide()
        engine = self.gw.engine
        for definition in self.registry.served.values():
            engine.upsert_device(definition.device, definition.model)
        for dev_id, (namespace, name) in decision.unserved.items():
            engine.define_unserved(dev_id, namespace, name)
        self._note_served(decision)
        return decision

    def _split_models(self, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Cluster DeviceModels go to the registry directly; Devices are returned."""
        devices = []
        for obj in objects:
            if obj.get("kind") == "DeviceModel":
                meta = obj.get("metadata") or {}
                self.registry.cluster_models[(str(meta.get("namespace")), str(meta.get("name")))] = obj
            else:
                devices.append(obj)
        return devices

    def finish_load(self, decision: Decision) -> None:
        """After the store's twin rows are loaded: desired values of the specs, readiness."""
        now = _now_ms()
        for definition in self.registry.served.values():
            self._apply_spec(definition, None, now)
        self._apply_status(decision, now)
        self._list_dirty = True

    def counts(self) -> tuple[int, int]:
        """Devices served, and declared devices that are not Ready (for the Gateway)."""
        registry = self.registry
        return len(registry.served), sum(1 for r in registry.readiness.values() if not r.ready)

    def served(self) -> list[tuple[Device, DeviceModel]]:
        return [(d.device, d.model) for d in self.registry.served.values()]

    # ----------------------------------------------------------------- from the cloud
    def on_cloud(self, msg: dict[str, Any]) -> None:
        """A message about cluster objects from the uplink (upsert, delete, synced, rv)."""
        kind = msg["t"]
        if kind == "upsert":
            obj = msg["obj"]
            meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            ns, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
            stamp = cloud_stamp(meta) if msg["kind"] == "Device" else None
            decision = self.registry.upsert(msg["kind"], obj)
            self._keep_object(msg["kind"], ns, name)
            self.apply(decision, {f"{ns}.{name}": stamp} if stamp else {})
            if msg["kind"] == "Device":
                dev_id = f"{ns}.{name}"
                adopted = self.gw.engine.adopt_status(dev_id, obj.get("status"), _now_ms())
                if adopted:
                    log.info(
                        "adopted the cloud's status (versions continue above it)", extra={"device": dev_id}
                    )
                if self.gw.uplink is not None:
                    self.gw.uplink.retry_now(dev_id)
        elif kind == "delete":
            decision = self.registry.delete(msg["kind"], msg["ns"], msg["name"])
            self._objects[(msg["kind"], msg["ns"], msg["name"])] = None
            self.apply(decision, {})
        elif kind == "synced":
            before = self._cluster_keys(msg["kind"])
            decision = self.registry.synced(msg["kind"], msg["names"])
            for key in before - self._cluster_keys(msg["kind"]):
                self._objects[key] = None
            self.apply(decision, {})
        self.gw.changed()

    def _cluster_keys(self, kind: str) -> set[tuple[str, str, str]]:
        if kind == "DeviceModel":
            return {("DeviceModel", ns, name) for ns, name in self.registry.cluster_models}
        return {("Device", cd.namespace, cd.name) for cd in self.registry.cluster_devices.values()}

    def _keep_object(self, kind: str, ns: str, name: str) -> None:
        if kind == "DeviceModel":
            obj = self.registry.cluster_models.get((ns, name))
        else:
            cd = self.registry.cluster_devices.get(f"{ns}.{name}")
            obj = cd.obj if cd is not None else None
        if obj is not None:
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            self._objects[(kind, ns, name)] = (rv, json.dumps(obj, sort_keys=True))

    # ----------------------------------------------------------------- applying decisions
    def apply(self, decision: Decision, stamps: dict[str, Stamp]) -> None:
        if not decision:
            return
        engine, now = self.gw.engine, _now_ms()
        for dev_id in decision.remove:
            dev = engine.devices.get(dev_id)
            if dev is not None:
                self._cleared.append((dev.namespace, dev.name, list(dev.properties)))
                self._removed.append((dev_id, dev.name))
            engine.remove_device(dev_id)
            self.gw.recent.forget_device(dev_id)
            self._served[dev_id] = None
        for definition in decision.serve:
            was = engine.devices.get(definition.id)
            if was is None or not was.served:
                self._added.append(definition.id)
            engine.upsert_device(definition.device, definition.model)
            self._apply_spec(definition, stamps.get(definition.id), now)
        for dev_id, (namespace, name) in decision.unserved.items():
            engine.define_unserved(dev_id, namespace, name)
        self._note_served(decision)
        self._apply_status(decision, now)
        self._list_dirty = True
        serve = [(d.device, d.model) for d in decision.serve]
        if serve or decision.remove:
            self._mapper_changes.put_nowait((serve, list(decision.remove)))

    def _apply_spec(self, definition: Definition, stamp: Stamp | None, now: int) -> None:
        try:
            outcomes = self.gw.engine.apply_spec(definition.device, now, stamp)
        except ValueError as exc:  # checked on load; a defensive net
            log.warning(
                "desired value of the spec not applied", extra={"device": definition.id, "error": str(exc)}
            )
            return
        if any(o.write_pending for o in outcomes):
            self.gw.writes_wake()

    def _note_served(self, decision: Decision) -> None:
        for definition in decision.serve:
            self._served[definition.id] = (
                definition.source,
                definition.generation,
                definition.rv,
                definition.device.model_dump_json(),
                definition.model.model_dump_json(),
            )
            self._spec_topics.add(definition.id)
        for dev_id in decision.remove:
            self._spec_topics.discard(dev_id)

    def _apply_status(self, decision: Decision, now: int) -> None:
        engine, store_id = self.gw.engine, self.gw.store_id
        for dev_id, readiness in decision.readiness.items():
            if dev_id in engine.devices:
                status = "True" if readiness.ready else "False"
                engine.set_condition(dev_id, "Ready", status, readiness.reason, readiness.message, now)
        for dev_id in {*decision.readiness, *(d.id for d in decision.serve)}:
            if dev_id not in engine.devices:
                continue
            overridden = dev_id in self.registry.manifest_devices and dev_id in self.registry.cluster_devices
            if overridden:
                engine.set_condition(
                    dev_id,
                    "LocalManifest",
                    "True",
                    "ClusterDefinitionServed",
                    f"gateway {self.gw.node} also has a local manifest for this device; "
                    "the cluster's definition is served",
                    now,
                )
            else:
                engine.set_condition(dev_id, "LocalManifest", None, "", "", now)
        for dev_id, generation in decision.observed.items():
            if dev_id in engine.devices:
                engine.set_observed_generation(dev_id, generation, store_id)
        for dev_id, kind, detail in decision.events:
            engine.record_event(now, dev_id, "", kind, detail)
            log.info("device " + kind, extra={"device": dev_id, "detail": json.dumps(detail)})

    async def run_mapper_changes(self) -> None:
        """Apply mapper changes in order, one device at a time (a task of the gateway)."""
        while True:
            serve, remove = await self._mapper_changes.get()
            if self.gw.mappers is not None:
                await self.gw.mappers.apply(serve, remove)

    # ----------------------------------------------------------------- commit and MQTT
    def take_rows(
        self,
    ) -> tuple[
        list[tuple[str, str, str, str, str]],
        list[tuple[str, str, str]],
        list[tuple[str, str, int, str, str, str]],
        list[tuple[str]],
    ]:
        """Rows for the next commit: cluster objects kept and deleted, served and unserved."""
        objects = [(k, ns, n, *row) for (k, ns, n), row in self._objects.items() if row is not None]
        deleted = [key for key, row in self._objects.items() if row is None]
        served = [(d, *row) for d, row in self._served.items() if row is not None]
        unserved = [(d,) for d, row in self._served.items() if row is None]
        self._objects, self._served = {}, {}
        return objects, deleted, served, unserved

    def publish(self, publish: Any, changed_devices: set[str]) -> None:
        """After a commit: retained device topics for what changed, membership events."""
        node, engine = self.gw.node, self.gw.engine
        for namespace, name, props in self._cleared:
            for topic in [
                topics.device_state(node, namespace, name),
                topics.device_spec(node, namespace, name),
            ]:
                publish(topic, b"", 1, True)
            for prop in props:
                publish(topics.property_value(node, namespace, name, prop), b"", 1, True)
        for dev_id in changed_devices:
            dev = engine.devices.get(dev_id)
            if dev is not None:
                publish(
                    topics.device_state(node, dev.namespace, dev.name), payloads.device_state(dev), 1, True
                )
        for dev_id in self._spec_topics:
            definition = self.registry.served.get(dev_id)
            if definition is not None:
                ns, name = definition.device.metadata.namespace, definition.device.metadata.name
                publish(topics.device_spec(node, ns, name), payloads.device_spec(definition), 1, True)
        if self._added or self._removed:
            added = [engine.devices[d] for d in self._added if d in engine.devices]
            body = payloads.membership_updated(_now_ms(), added, self._removed)
            publish(topics.membership_updated(node), body, 1, False)
        if self._list_dirty:
            publish(topics.device_list(node), payloads.device_list(self.listing()), 1, True)
        self._cleared, self._added, self._removed, self._spec_topics = [], [], [], set()
        self._list_dirty = False

    def republish_all(self) -> None:
        """After a (re)connect to the broker: every device topic again."""
        self._spec_topics = set(self.registry.served)
        self._list_dirty = True

    def listing(self) -> list[dict[str, Any]]:
        out = []
        for dev_id, dev in sorted(self.gw.engine.devices.items()):
            definition = self.registry.served.get(dev_id)
            ready = dev.conditions.get("Ready")
            out.append(
                {
                    "id": dev_id,
                    "namespace": dev.namespace,
                    "name": dev.name,
                    "model": dev.model,
                    "protocol": dev.protocol,
                    "source": definition.source if definition else "cluster",
                    "served": dev.served,
                    "ready": ready["status"] == "True" if ready else None,
                }
            )
        return out


def _source(text: str) -> Source:
    return "cluster" if text == "cluster" else "manifest"


def _spec_path(device: Device, message: str) -> str:
    """A mapper's error with the field named as in the Device, where kubectl shows it:
    ``device ns.x property p: visitors.configData.table: ...`` becomes
    ``spec.properties[2].visitors.configData.table: ...``."""
    prefix = f"device {device.id} property "
    if message.startswith(prefix):
        name, sep, rest = message[len(prefix) :].partition(": ")
        names = [p.name for p in device.spec.properties]
        if sep and name in names:
            return f"spec.properties[{names.index(name)}].{rest}"
    return message.removeprefix(f"device {device.id}: ")


def _installed(protocol: str) -> bool:
    from edgetwin.gateway.mapper_host import discover

    return protocol in discover()
