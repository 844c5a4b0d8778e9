"""Which definition of each device the gateway serves: from local manifests, or from the
cluster (Devices for this node and their DeviceModels, brought by the uplink). Pure: it
takes objects and returns decisions; the service applies them (engine, mappers, store,
MQTT). docs/crds.md ("Where devices come from") states the same rule for users:

1. A device the cluster defines for this node is served from the cluster, whether or not
   a local manifest defines it too. The manifest's copy is then unused: an event at the
   edge says so, and the Device's status carries the condition ``LocalManifest``.
2. A device only local manifests define is served from them (sites with no cluster).
3. A cluster definition that cannot be served (not a valid Device, no such DeviceModel
   in its namespace, a property or desired value that does not fit the model, a mapper
   that refuses its protocol or visitor config) is not applied. The device keeps what it
   was served with before (the previous cluster generation, or its manifest), or is not
   served at all if it had nothing; ``Ready=False`` names the field and the problem.
4. A Device deleted in the cluster falls back to its manifest, if there is one, and is
   otherwise removed: its mapper stops serving it, its twin and outbox entry go.

Cluster devices use cluster DeviceModels, manifest devices manifest DeviceModels.
A device whose protocol no installed mapper plugin serves is served over MQTT (an
external mapper may report for it) and is ``Ready`` only if the gateway config names
that protocol under ``external_protocols``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from edgetwin.deviceapi import Device, DeviceModel, ManifestError
from edgetwin.deviceapi.types import check_device_against_model, device_id, first_problem

Source = Literal["manifest", "cluster"]
# A mapper-level check of a definition: None when fine, else (reason, message).
Check = Callable[[Device, DeviceModel], "tuple[str, str] | None"]
# Whether a protocol is served: by an installed mapper plugin, or declared external.
Serves = Callable[[str], bool]


@dataclass(frozen=True)
class Definition:
    """A device as served: its spec, its model, where they came from."""

    device: Device
    model: DeviceModel
    source: Source
    generation: int = 0
    rv: str = ""

    @property
    def id(self) -> str:
        return self.device.id

    def same_as(self, other: Definition | None) -> bool:
        return (
            other is not None
            and other.source == self.source
            and other.device.spec == self.device.spec
            and other.model.spec == self.model.spec
        )


@dataclass(frozen=True)
class Readiness:
    """The ``Ready`` condition of a declared device."""

    ready: bool
    reason: str
    message: str


@dataclass
class Decision:
    """What changed: definitions to start or reconfigure, devices to stop serving,
    readiness to report, and events for the edge's log."""

    serve: list[Definition] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    readiness: dict[str, Readiness] = field(default_factory=dict)
    # Cluster devices declared but not served (no valid definition, nothing to fall back
    # on): (namespace, name). They get a placeholder twin so their status can be written.
    unserved: dict[str, tuple[str, str]] = field(default_factory=dict)
    observed: dict[str, int] = field(default_factory=dict)  # cluster generation seen per device
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (device, kind, detail)

    def __bool__(self) -> bool:
        return bool(
            self.serve or self.remove or self.readiness or self.unserved or self.observed or self.events
        )


@dataclass
class _ClusterDevice:
    obj: dict[str, Any]
    namespace: str
    name: str

    @property
    def generation(self) -> int:
        generation = _dict(self.obj.get("metadata")).get("generation")
        return generation if isinstance(generation, int) and not isinstance(generation, bool) else 0

    @property
    def rv(self) -> str:
        return str(_dict(self.obj.get("metadata")).get("resourceVersion") or "")


def strip_object(obj: dict[str, Any]) -> dict[str, Any]:
    """What is kept of a cluster object: without status and server bookkeeping. It shares
    the object's spec (a message decoded for this alone; neither side changes it) rather
    than copying it: a copy of a thousand Devices' specs was half a megabyte."""
    out = {str(k): v for k, v in obj.items() if k != "status"}
    meta = out.get("metadata")
    if isinstance(meta, dict):
        drop = ("managedFields", "uid", "creationTimestamp", "selfLink")
        out["metadata"] = {k: v for k, v in meta.items() if k not in drop}
    return out


class Registry:
    def __init__(self, node: str, check: Check, serves: Serves = lambda _protocol: True) -> None:
        self.node = node
        self.check = check
        self.serves = serves
        self.manifest_devices: dict[str, Device] = {}
        self.manifest_models: dict[tuple[str, str], DeviceModel] = {}
        self.manifest_files: dict[str, str] = {}
        self.cluster_devices: dict[str, _ClusterDevice] = {}
        self.cluster_models: dict[tuple[str, str], dict[str, Any]] = {}
        self.served: dict[str, Definition] = {}
        self.readiness: dict[str, Readiness] = {}
        self._told_override: set[str] = set()

    # ----------------------------------------------------------------- inputs
    def set_manifests(self, devices: Iterable[Device], models: Iterable[DeviceModel]) -> None:
        self.manifest_devices = {d.id: d for d in devices}
        self.manifest_models = {(m.metadata.namespace, m.metadata.name): m for m in models}

    def restore(self, cluster: Iterable[dict[str, Any]], served: Iterable[Definition]) -> None:
        """At start: the cluster objects and served definitions kept in the store."""
        for obj in cluster:
            self._put_cluster(obj)
        self.served = {d.id: d for d in served}

    def upsert(self, kind: str, obj: dict[str, Any]) -> Decision:
        """A Device or DeviceModel added or changed in the cluster."""
        if kind == "DeviceModel":
            key = _key(obj)
            self.cluster_models[key] = strip_object(obj)
            return self.decide(self._users_of(key))
        dev_id = self._put_cluster(obj)
        return self.decide([dev_id]) if dev_id else Decision()

    def delete(self, kind: str, namespace: str, name: str) -> Decision:
        if kind == "DeviceModel":
            if self.cluster_models.pop((namespace, name), None) is None:
                return Decision()
            return self.decide(self._users_of((namespace, name)))
        dev_id = device_id(namespace, name)
        if self.cluster_devices.pop(dev_id, None) is None:
            return Decision()
        return self.decide([dev_id])

    def synced(self, kind: str, names: Iterable[str]) -> Decision:
        """After a relist: cluster objects of ``kind`` not named are gone."""
        alive = set(names)
        gone: list[str] = []
        if kind == "DeviceModel":
            for key in [k for k in self.cluster_models if f"{k[0]}/{k[1]}" not in alive]:
                del self.cluster_models[key]
                gone += self._users_of(key)
        else:
            for dev_id, cd in list(self.cluster_devices.items()):
                if f"{cd.namespace}/{cd.name}" not in alive:
                    del self.cluster_devices[dev_id]
                    gone.append(dev_id)
        return self.decide(gone)

    def _put_cluster(self, obj: dict[str, Any]) -> str:
        namespace, name = _key(obj)
        if not name:
            return ""
        dev_id = device_id(namespace, name)
        self.cluster_devices[dev_id] = _ClusterDevice(strip_object(obj), namespace, name)
        return dev_id

    def _users_of(self, model_key: tuple[str, str]) -> list[str]:
        return [
            dev_id
            for dev_id, cd in self.cluster_devices.items()
            if (cd.namespace, _dict(_dict(cd.obj.get("spec")).get("deviceModelRef")).get("name")) == model_key
        ]

    def cluster_objects(self) -> list[tuple[str, str, str, str, str]]:
        """Rows to keep in the store: (kind, namespace, name, resourceVersion, JSON body)."""
        import json

        rows = [
            ("Device", cd.namespace, cd.name, cd.rv, json.dumps(cd.obj, sort_keys=True))
            for cd in self.cluster_devices.values()
        ]
        rows += [
            (
                "DeviceModel",
                ns,
                name,
                str(_dict(obj.get("metadata")).get("resourceVersion") or ""),
                json.dumps(obj),
            )
            for (ns, name), obj in self.cluster_models.items()
        ]
        return rows

    # ----------------------------------------------------------------- the rule
    def decide(self, ids: Iterable[str] | None = None) -> Decision:
        """Decide (again) what each of ``ids`` (all declared devices when None) is
        served with, and apply it to :attr:`served`."""
        decision = Decision()
        if ids is None:
            ids = set(self.manifest_devices) | set(self.cluster_devices) | set(self.served)
        for dev_id in sorted(set(ids)):
            self._decide_one(dev_id, decision)
        return decision

    def _decide_one(self, dev_id: str, decision: Decision) -> None:
        previous = self.served.get(dev_id)
        manifest = self._manifest_definition(dev_id)
        cd = self.cluster_devices.get(dev_id)
        want: Definition | None
        if cd is not None:
            decision.observed[dev_id] = cd.generation
            parsed = self._cluster_definition(cd)
            if isinstance(parsed, Definition):
                want, readiness = parsed, self._ready(parsed)
                if manifest is not None and dev_id not in self._told_override:
                    self._told_override.add(dev_id)
                    decision.events.append(
                        (
                            dev_id,
                            "definition",
                            {
                                "message": f"the cluster defines this device (generation {cd.generation}); "
                                "the local manifest's definition "
                                f"({self.manifest_files.get(dev_id, 'manifests')}) is not used"
                            },
                        )
                    )
            else:
                reason, message = parsed
                fallback = previous if previous is not None else manifest
                want = fallback
                if fallback is not None:
                    what = (
                        f"the previous cluster generation {fallback.generation}"
                        if fallback.source == "cluster"
                        else "its local manifest"
                    )
                    message = f"{message}; the device is still served with {what}"
                readiness = Readiness(False, reason, message)
                decision.events.append((dev_id, "definition", {"reason": reason, "message": message}))
            if manifest is None:
                self._told_override.discard(dev_id)
        else:
            self._told_override.discard(dev_id)
            want = manifest
            readiness = self._ready(manifest) if manifest is not None else Readiness(False, "", "")
        if want is None:
            if previous is not None:
                del self.served[dev_id]
                decision.remove.append(dev_id)
                decision.events.append(
                    (dev_id, "removed", {"message": "deleted in the cluster; no longer served"})
                    if cd is None
                    else (dev_id, "removed", {"message": "not served: " + readiness.message})
                )
            if cd is not None:
                decision.unserved[dev_id] = (cd.namespace, cd.name)
        else:
            if not want.same_as(previous) or (
                previous is not None and previous.generation != want.generation
            ):
                self.served[dev_id] = want
                decision.serve.append(want)
                if previous is not None and previous.source != want.source:
                    decision.events.append(
                        (dev_id, "definition", {"message": f"now served from its {want.source} definition"})
                    )
        if cd is not None or manifest is not None:
            if self.readiness.get(dev_id) != readiness:
                self.readiness[dev_id] = readiness
                decision.readiness[dev_id] = readiness
        else:
            self.readiness.pop(dev_id, None)

    def _manifest_definition(self, dev_id: str) -> Definition | None:
        device = self.manifest_devices.get(dev_id)
        if device is None:
            return None
        model = self.manifest_models[(device.metadata.namespace, device.spec.deviceModelRef.name)]
        return Definition(device, model, "manifest")

    def _cluster_definition(self, cd: _ClusterDevice) -> Definition | tuple[str, str]:
        """The cluster's definition, or (reason, message) naming what is wrong."""
        try:
            device = Device.model_validate(cd.obj)
        except ValidationError as exc:
            key, msg = first_problem(exc)
            return "InvalidSpec", f"{key}: {msg}"
        if device.spec.nodeName != self.node:
            return (
                "OtherNode",
                f"spec.nodeName: {device.spec.nodeName!r} is not this gateway's node {self.node!r}",
            )
        model_key = (cd.namespace, device.spec.deviceModelRef.name)
        raw_model = self.cluster_models.get(model_key)
        if raw_model is None:
            return "ModelNotFound", (
                f"spec.deviceModelRef.name: DeviceModel {model_key[0]}/{model_key[1]} does not exist "
                "(a model must be in the device's namespace)"
            )
        try:
            model = DeviceModel.model_validate(raw_model)
        except ValidationError as exc:
            key, msg = first_problem(exc)
            return "InvalidModel", f"DeviceModel {model_key[0]}/{model_key[1]}: {key}: {msg}"
        try:
            check_device_against_model(device, model)
        except ManifestError as exc:
            return "InvalidSpec", exc.problem
        problem = self.check(device, model)
        if problem is not None:
            return problem
        return Definition(device, model, "cluster", cd.generation, cd.rv)

    def _ready(self, definition: Definition) -> Readiness:
        protocol = definition.device.spec.protocol
        if protocol is not None and not self.serves(protocol.protocolName):
            return Readiness(
                False,
                "NoMapper",
                f"spec.protocol.protocolName: no mapper plugin {protocol.protocolName!r} is installed and "
                "it is not in the gateway's external_protocols; values are taken over MQTT only",
            )
        how = f"the {protocol.protocolName} mapper" if protocol else "an external mapper over MQTT"
        return Readiness(True, "Served", f"served by {how} ({definition.source} definition)")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = _dict(obj.get("metadata"))
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")
