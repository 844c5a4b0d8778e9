"""The twin engine: every rule about reported and desired state, in one place.

Pure and sans-IO. Callers pass in values and the time; the engine updates twins in
memory and records what changed (:class:`Changes`) for the caller to persist, publish
and sync. Rules (DESIGN.md, "Twin rules"):

* A reported value is checked and coerced against the model type; an accepted value gets
  the property's next ``version`` (strictly increasing, persisted by the caller with the
  value, so a version that anyone has seen is never given to another value).
* Reported state belongs to the edge; nothing from the cloud changes it.
* Desired writes come from the spec (``origin="cloud"``: the cloud, or local manifests
  standing in for it) or from the edge (``origin="edge"``). Between the two, per
  property the later HLC stamp wins; on equal stamps the cloud wins. A new spec value
  always replaces the previous spec value (the API server orders spec writes). The
  loser is recorded as a :class:`Conflict` when it was a real concurrent change: an
  incoming write older than the one in effect, or a cloud write replacing an edge write
  the cloud had not yet acknowledged.
* A writable property whose desired value differs from reported has a pending write;
  :meth:`TwinEngine.due_writes` hands out attempts with exponential backoff until the
  device reports the desired value (applied) or the attempts run out (failed).
* Every change is folded into the device's single pending status patch (the outbox).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from edgetwin.deviceapi import Device, DeviceModel, PropertyType, Value, ValueRejected, coerce_value
from edgetwin.deviceapi.values import value_to_text
from edgetwin.gateway.twin.hlc import HybridClock, Stamp
from edgetwin.gateway.twin.patch import compose_into

Origin = Literal["cloud", "edge"]
ORIGINS: tuple[Origin, ...] = ("cloud", "edge")
DEVICE_STATES = ("online", "offline", "unknown")

# A message may name thousands of unknown properties: answers list at most this many.
MAX_REJECTED_LISTED = 20
# A property's read errors (and rejected values) reach the event log when they change, at
# most once per this many ms per property; the others are counted in the next event.
EVENT_REPEAT_MS = 600_000

# Desired writes are retried with exponential backoff up to this many attempts.
MAX_WRITE_ATTEMPTS = 8
WRITE_BACKOFF_BASE_MS = 1_000
WRITE_BACKOFF_MAX_MS = 60_000


@dataclass(frozen=True, slots=True)
class WritePolicy:
    """How desired writes are retried: ``attempts`` delivered attempts, the first after
    ``backoff_min_ms`` doubling to ``backoff_max_ms`` (each jittered by +-50%)."""

    attempts: int = MAX_WRITE_ATTEMPTS
    backoff_min_ms: int = WRITE_BACKOFF_BASE_MS
    backoff_max_ms: int = WRITE_BACKOFF_MAX_MS


def _always(_device_id: str) -> bool:
    return True


class TwinError(Exception):
    """Base of the engine's errors; each names the device and property involved."""


class UnknownDevice(TwinError):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"unknown device {device_id!r} (not in the manifests for this node)")
        self.device_id = device_id


class DesiredRejected(TwinError):
    def __init__(self, device_id: str, prop: str, reason: str) -> None:
        super().__init__(f"desired value for {device_id}/{prop} rejected: {reason}")
        self.device_id = device_id
        self.property = prop
        self.reason = reason


class WriteState(StrEnum):
    NONE = ""
    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"


@dataclass(slots=True)
class Reported:
    value: Value
    timestamp: int  # ms since the epoch, from the mapper when it gave one
    version: int


@dataclass(slots=True)
class Desired:
    value: Value
    origin: Origin
    stamp: Stamp
    # True once the cloud holds this write: always for cloud writes; for edge writes
    # after the outbox revision carrying it is acknowledged.
    acked: bool = True
    outbox_revision: int = 0


@dataclass(frozen=True, slots=True)
class Conflict:
    """A desired write that lost under the rule; kept in the event log and status."""

    device_id: str
    property: str
    winner: Desired
    loser: Desired

    def describe(self) -> str:
        return (
            f"{self.property}: {self.winner.origin} value {value_to_text(self.winner.value)!r} "
            f"(stamp {self.winner.stamp}) won over {self.loser.origin} value "
            f"{value_to_text(self.loser.value)!r} (stamp {self.loser.stamp}); "
            "rule: later HLC stamp wins, ties go to the cloud"
        )


@dataclass(slots=True)
class PropertyTwin:
    name: str
    type: PropertyType
    writable: bool
    minimum: float | None = None
    maximum: float | None = None
    reported: Reported | None = None
    desired: Desired | None = None
    last_version: int = 0
    # Canonical text of the desired value last seen in the spec, so that re-reading an
    # unchanged spec (restart, relist) is not mistaken for a new cloud write.
    spec_desired: str | None = None
    write_state: WriteState = WriteState.NONE
    write_reason: str = ""
    write_attempts: int = 0
    next_write_ms: int | None = None
    last_conflict: Conflict | None = None
    # Revision of the device's outbox entry that last took this property; None once
    # the cloud acknowledged it. Persisted with the row, so the outbox is rebuilt from
    # the twin rows at start instead of rewriting a whole patch on every commit.
    outbox_rev: int | None = None
    # Which of its status fields are pending (REPORTED | DESIRED | READ_ERROR); their
    # current values are read when the outbox entry's patch is built.
    outbox_fields: int = 0
    # Why the last read of this property failed ("" when it did not); cleared by the
    # next accepted value. The other properties of the device keep reporting.
    read_error: str = ""


@dataclass(slots=True)
class DeviceTwin:
    id: str
    namespace: str
    name: str
    model: str
    protocol: str | None
    properties: dict[str, PropertyTwin]
    state: str = "unknown"
    last_online_ms: int | None = None
    # False for a device declared in the cluster that cannot be served: a placeholder
    # with no properties, kept so its status (Ready=False and why) can be written.
    served: bool = True
    # Conditions reported in Device status, by type (the dict as status shows it).
    conditions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The cluster spec generation this gateway has seen for it (0: none).
    observed_generation: int = 0


# Status fields of a property pending in the outbox (PropertyTwin.outbox_fields).
REPORTED, DESIRED, READ_ERROR = 1, 2, 4
ALL_FIELDS = REPORTED | DESIRED | READ_ERROR


@dataclass(slots=True)
class OutboxEntry:
    """The one pending status patch of a device. Device-level fields (state, conditions,
    observedGeneration) are composed as they change; properties are only marked, with
    which of their fields changed, and their current status is read when :attr:`patch`
    is built (once per revision, when the uplink sends it), so a value changing ten
    times between two sends costs a mark each time, not a patch. ``revision`` moves with
    every change; ``since_ms``: since when (wall ms) the device has had status pending."""

    dev: DeviceTwin
    device: dict[str, Any]
    revision: int
    since_ms: int = 0
    props: dict[str, None] = field(default_factory=dict)  # pending properties, in order
    removed: set[str] = field(default_factory=set)  # properties gone from the model
    _patch: dict[str, Any] | None = None

    @property
    def patch(self) -> dict[str, Any]:
        """The Device status merge patch (``twins`` keyed by property name)."""
        if self._patch is None:
            patch = dict(self.device)
            twins: dict[str, Any] = {}
            properties = self.dev.properties
            for name in self.props:
                prop = properties.get(name)
                if prop is None:
                    continue
                fields, entry = prop.outbox_fields, {}  # type: int, dict[str, Any]
                if fields & REPORTED and prop.reported is not None:
                    entry["reported"] = reported_status(prop)
                if fields & DESIRED and prop.desired is not None:
                    entry["observedDesired"] = desired_status(prop)
                if fields & READ_ERROR:
                    entry["readError"] = prop.read_error or None
                twins[name] = entry
            for name in self.removed:
                twins[name] = None
            if twins:
                patch["twins"] = twins
            self._patch = patch
        return self._patch


@dataclass(frozen=True, slots=True)
class Event:
    ts_ms: int
    device_id: str
    property: str
    kind: str  # conflict | rejected | write_failed | state
    detail: dict[str, Any]


@dataclass(slots=True)
class Changes:
    """What changed since the last :meth:`TwinEngine.drain`, for the caller to persist."""

    properties: set[tuple[str, str]] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    outbox: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)

    # Properties whose public view (reported value or readError) changed: the caller
    # republishes their retained MQTT value after the commit.
    public: set[tuple[str, str]] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.properties or self.devices or self.outbox or self.removed or self.events)


@dataclass(slots=True)
class ReportOutcome:
    accepted: dict[str, Reported]
    rejected: dict[str, str]


@dataclass(slots=True)
class DesiredOutcome:
    property: str
    won: bool
    desired: Desired  # the desired value in effect after the write
    conflict: Conflict | None
    write_pending: bool


@dataclass(frozen=True, slots=True)
class WriteRequest:
    device_id: str
    property: str
    value: Value
    attempt: int


class EventLimiter:
    """At most one event per key every ``interval_ms``; what it holds back is counted
    and reported with the next event it lets through. Bounded by the keys used
    (devices x properties), and entries are dropped with their device."""

    def __init__(self, interval_ms: int) -> None:
        self.interval_ms = interval_ms
        self._last: dict[tuple[str, str], int] = {}
        self._held: dict[tuple[str, str], int] = {}

    def allow(self, key: tuple[str, str], now_ms: int) -> bool:
        last = self._last.get(key)
        if last is not None and now_ms - last < self.interval_ms:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now_ms
        return True

    def annotate(self, key: tuple[str, str], detail: dict[str, Any]) -> dict[str, Any]:
        """``detail`` plus how many events were held back since the last one."""
        held = self._held.pop(key, 0)
        return {**detail, "suppressed": held} if held else detail

    def forget(self, device_id: str) -> None:
        for table in (self._last, self._held):
            for key in [k for k in table if k[0] == device_id]:
                del table[key]


_SANE_WALL_MS = 978_307_200_000  # 2001: anything earlier is not a wall clock reading


def clip(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters (names and reasons from peers are unbounded)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def canonical(value: Value) -> str:
    return json.dumps(value, sort_keys=True)


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class TwinEngine:
    """All device twins of one gateway, and the rules that change them."""

    def __init__(
        self,
        clock: HybridClock | None = None,
        jitter: Callable[[], float] = lambda: 0.5,
        writes: WritePolicy | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.clock = clock or HybridClock()
        self._wall_ms = wall_ms
        self.writes = writes or WritePolicy()
        self.devices: dict[str, DeviceTwin] = {}
        self.outbox: dict[str, OutboxEntry] = {}
        self.changes = Changes()
        self._jitter = jitter
        # Outbox revisions come from one counter for all devices, so an acknowledgement
        # of an old entry can never match a newer one (see seed_revisions).
        self._revision = 0
        self._limiter = EventLimiter(EVENT_REPEAT_MS)

    # ----------------------------------------------------------------- definitions
    def upsert_device(self, device: Device, model: DeviceModel) -> DeviceTwin:
        """Define (or redefine) a device's twin from its spec and model, keeping the
        state of properties that still exist. Spec desired values are applied separately
        by :meth:`apply_spec`."""
        dev_id = device.id
        old = self.devices.get(dev_id)
        props: dict[str, PropertyTwin] = {}
        for mp in model.spec.properties:
            prev = old.properties.get(mp.name) if old else None
            twin = prev or PropertyTwin(name=mp.name, type=mp.type, writable=mp.writable)
            twin.type, twin.writable = mp.type, mp.writable
            twin.minimum, twin.maximum = mp.minimum, mp.maximum
            props[mp.name] = twin
        protocol = device.spec.protocol.protocolName if device.spec.protocol else None
        twin_dev = DeviceTwin(
            id=dev_id,
            namespace=device.metadata.namespace,
            name=device.metadata.name,
            model=model.metadata.name,
            protocol=protocol,
            properties=props,
            state=old.state if old else "unknown",
            last_online_ms=old.last_online_ms if old else None,
            conditions=old.conditions if old else {},
            observed_generation=old.observed_generation if old else 0,
        )
        self.devices[dev_id] = twin_dev
        self.changes.devices.add(dev_id)
        self.changes.properties.update((dev_id, name) for name in props)
        entry = self.outbox.get(dev_id)
        if entry is not None:
            entry.dev, entry._patch = twin_dev, None
        removed = sorted(set(old.properties) - set(props)) if old is not None else []
        if removed:
            # Gone from the model: its rows go, and the cloud drops its twin entry.
            self.changes.properties.update((dev_id, name) for name in removed)
            entry = self._entry(dev_id)
            for name in removed:
                entry.props.pop(name, None)
                entry.removed.add(name)
            self._bump(entry)
            self.changes.outbox.add(dev_id)  # removals live in the outbox row
        return twin_dev

    def define_unserved(self, device_id: str, namespace: str, name: str) -> DeviceTwin:
        """A placeholder for a device declared in the cluster that cannot be served: no
        properties, no values, only status (conditions) to report."""
        dev = self.devices.get(device_id)
        if dev is None or dev.served:
            old = dev
            dev = DeviceTwin(device_id, namespace, name, "", None, {}, served=False)
            if old is not None:
                dev.conditions, dev.observed_generation = old.conditions, old.observed_generation
                dev.state, dev.last_online_ms = old.state, old.last_online_ms
            self.devices[device_id] = dev
            self.changes.devices.add(device_id)
        return dev

    def remove_device(self, device_id: str) -> None:
        if self.devices.pop(device_id, None) is not None:
            self.outbox.pop(device_id, None)
            self.changes.removed.add(device_id)
            self._limiter.forget(device_id)

    def device(self, device_id: str) -> DeviceTwin:
        try:
            return self.devices[device_id]
        except KeyError:
            raise UnknownDevice(device_id) from None

    # ----------------------------------------------------------------- reported
    def apply_reported(
        self,
        device_id: str,
        values: Mapping[str, Any],
        now_ms: int,
        timestamp_ms: int | None = None,
    ) -> ReportOutcome:
        """Accept the reported values that fit their property; reject the rest with a
        reason. Each accepted value gets the property's next version. A value the model
        cannot hold marks its property with a ``readError`` (it keeps its last good
        value), like a failed read; unknown property names are refused and counted."""
        dev = self.device(device_id)
        accepted: dict[str, Reported] = {}
        rejected: dict[str, str] = {}
        marks: dict[str, int] = {}
        unknown: list[str] = []
        ts = timestamp_ms if timestamp_ms is not None else now_ms
        changed_props, public = self.changes.properties, self.changes.public
        for name, raw in values.items():
            prop = dev.properties.get(name)
            if prop is None:
                unknown.append(name)
                continue
            try:
                value = coerce_value(raw, prop.type, prop.minimum, prop.maximum)
            except ValueRejected as exc:
                rejected[name] = exc.reason
                if self._mark_read_error(dev, prop, f"value rejected: {exc.reason}", now_ms, "rejected"):
                    marks[name] = READ_ERROR
                continue
            prop.last_version += 1
            prop.reported = reported = Reported(value, ts, prop.last_version)
            accepted[name] = reported
            fields = REPORTED
            if prop.read_error:
                prop.read_error = ""
                fields |= READ_ERROR
            if (
                prop.write_state is WriteState.PENDING
                and prop.desired is not None
                and _same(prop.desired.value, value)
            ):
                prop.write_state, prop.write_reason = WriteState.APPLIED, ""
                prop.next_write_ms = None
                fields |= DESIRED
            marks[name] = fields
            key = (device_id, name)
            changed_props.add(key)
            public.add(key)
        if unknown:
            reason = f"not a property of DeviceModel {dev.model!r}"
            for name in unknown[:MAX_REJECTED_LISTED]:
                rejected[clip(name)] = reason
            if len(unknown) > MAX_REJECTED_LISTED:
                rejected["..."] = f"{len(unknown) - MAX_REJECTED_LISTED} more names that are not properties"
            key = (device_id, "")
            if self._limiter.allow(key, now_ms):
                detail = {"names": [clip(n) for n in unknown[:10]], "count": len(unknown), "reason": reason}
                self._event(now_ms, device_id, "", "rejected", self._limiter.annotate(key, detail))
        if marks:
            self._mark(device_id, marks)
        return ReportOutcome(accepted, rejected)

    def set_read_errors(self, device_id: str, errors: Mapping[str, str], now_ms: int) -> None:
        """Mark properties whose read failed, with the reason; a property not named
        keeps its state. The mark stays until a value for it is accepted."""
        dev = self.device(device_id)
        marks: dict[str, int] = {}
        for name, reason in errors.items():
            prop = dev.properties.get(name)
            if prop is not None and self._mark_read_error(dev, prop, clip(reason, 500), now_ms):
                marks[name] = READ_ERROR
        if marks:
            self._mark(device_id, marks)

    def _mark_read_error(
        self, dev: DeviceTwin, prop: PropertyTwin, reason: str, now_ms: int, kind: str = "read_error"
    ) -> bool:
        """Set a property's readError; returns whether it changed.
        The event log hears of it when it changes, at most once per
        :data:`EVENT_REPEAT_MS` per property (the rest are counted in the next event),
        so a device failing every poll cannot push other events out of the log."""
        if prop.read_error == reason:
            return False
        prop.read_error = reason
        key = (dev.id, prop.name)
        if self._limiter.allow(key, now_ms):
            self._event(now_ms, dev.id, prop.name, kind, self._limiter.annotate(key, {"reason": reason}))
        self.changes.properties.add((dev.id, prop.name))
        self.changes.public.add((dev.id, prop.name))
        return True

    # ----------------------------------------------------------------- desired
    def apply_desired(
        self,
        device_id: str,
        prop_name: str,
        raw: Any,
        origin: Origin,
        now_ms: int,
        stamp: Stamp | None = None,
    ) -> DesiredOutcome:
        """Apply a desired write under the conflict rule. ``stamp`` is the write's HLC
        stamp when it comes from elsewhere; a local write gets a fresh one."""
        dev = self.device(device_id)
        prop = dev.properties.get(prop_name)
        if prop is None:
            raise DesiredRejected(device_id, prop_name, f"not a property of DeviceModel {dev.model!r}")
        if not prop.writable:
            raise DesiredRejected(device_id, prop_name, "the property is ReadOnly in its model")
        try:
            value = coerce_value(raw, prop.type, prop.minimum, prop.maximum)
        except ValueRejected as exc:
            raise DesiredRejected(device_id, prop_name, exc.reason) from None
        if stamp is None:
            stamp = self.clock.now(now_ms)
        else:
            self.clock.observe(stamp)
        incoming = Desired(value, origin, stamp, acked=origin == "cloud")
        current = prop.desired
        if current is not None and not _wins(incoming, current):
            conflict = None
            if (incoming.origin, incoming.stamp) != (current.origin, current.stamp) and not _same(
                incoming.value, current.value
            ):
                conflict = Conflict(device_id, prop_name, winner=current, loser=incoming)
                self._record_conflict(prop, conflict, now_ms)
            return DesiredOutcome(prop_name, False, current, conflict, prop.write_state is WriteState.PENDING)

        conflict = None
        if (
            current is not None
            and current.origin == "edge"
            and incoming.origin == "cloud"
            and not current.acked
            and not _same(current.value, value)
        ):
            conflict = Conflict(device_id, prop_name, winner=incoming, loser=current)
            self._record_conflict(prop, conflict, now_ms)
        prop.desired = incoming
        if prop.reported is not None and _same(prop.reported.value, value):
            prop.write_state, prop.write_reason, prop.next_write_ms = WriteState.APPLIED, "", None
        else:
            prop.write_state, prop.write_reason = WriteState.PENDING, ""
            prop.write_attempts, prop.next_write_ms = 0, now_ms
        self.changes.properties.add((device_id, prop_name))
        entry = self._mark(device_id, {prop_name: DESIRED})
        incoming.outbox_revision = entry.revision
        return DesiredOutcome(prop_name, True, incoming, conflict, prop.write_state is WriteState.PENDING)

    def apply_spec(self, device: Device, now_ms: int, stamp: Stamp | None = None) -> list[DesiredOutcome]:
        """Apply the desired values written in a Device spec. Only a spec value that
        differs from the one last seen counts as a new cloud write."""
        outcomes = []
        for sp in device.spec.properties:
            if sp.desired is None:
                continue
            prop = self.device(device.id).properties.get(sp.name)
            if prop is None:
                continue
            value = coerce_value(sp.desired.value, prop.type, prop.minimum, prop.maximum)
            text = canonical(value)
            if text == prop.spec_desired:
                continue
            prop.spec_desired = text
            self.changes.properties.add((device.id, sp.name))
            outcomes.append(self.apply_desired(device.id, sp.name, value, "cloud", now_ms, stamp))
        return outcomes

    def deltas(self, device_id: str) -> dict[str, Value]:
        """Desired values of writable properties that differ from reported."""
        dev = self.device(device_id)
        return {
            name: p.desired.value
            for name, p in dev.properties.items()
            if p.writable
            and p.desired is not None
            and (p.reported is None or not _same(p.reported.value, p.desired.value))
        }

    # ----------------------------------------------------------------- writes
    def due_writes(self, now_ms: int, deliverable: Callable[[str], bool] = _always) -> list[WriteRequest]:
        """Hand out the desired writes whose next attempt is due, scheduling the next
        attempt with backoff; a write past its last attempt is marked failed.

        ``deliverable(device_id)`` says whether a write could reach the device now (its
        mapper or the broker is connected, the device is not offline). A device that
        cannot be reached keeps its schedule paused: no attempt is spent on it, and the
        caller asks again when that changes. An attempt handed out that still could not
        be delivered is given back with :meth:`write_undelivered`."""
        due: list[WriteRequest] = []
        policy = self.writes
        for dev in self.devices.values():
            paused: bool | None = None
            for prop in dev.properties.values():
                if (
                    prop.write_state is not WriteState.PENDING
                    or prop.next_write_ms is None
                    or prop.next_write_ms > now_ms
                    or prop.desired is None
                ):
                    continue
                if paused is None:
                    paused = not deliverable(dev.id)
                if paused:
                    continue
                if prop.write_attempts >= policy.attempts:
                    self._fail_write(dev.id, prop, now_ms)
                    continue
                prop.write_attempts += 1
                backoff = min(policy.backoff_max_ms, policy.backoff_min_ms * 2 ** (prop.write_attempts - 1))
                prop.next_write_ms = now_ms + int(backoff * (0.5 + self._jitter()))
                self.changes.properties.add((dev.id, prop.name))
                due.append(WriteRequest(dev.id, prop.name, prop.desired.value, prop.write_attempts))
        return due

    def next_write_due(self, deliverable: Callable[[str], bool] = _always) -> int | None:
        """When the next write attempt is due (ms) among devices that can be reached now,
        for the caller's timer."""
        best: int | None = None
        for dev in self.devices.values():
            times = [
                p.next_write_ms
                for p in dev.properties.values()
                if p.write_state is WriteState.PENDING and p.next_write_ms is not None
            ]
            if times and deliverable(dev.id):
                first = min(times)
                best = first if best is None else min(best, first)
        return best

    def write_undelivered(self, device_id: str, prop_name: str, now_ms: int, reason: str = "") -> None:
        """An attempt handed out by :meth:`due_writes` never reached the device (the
        broker or the device was down): it does not count. The write is tried again
        after the shortest backoff, once the device can be reached."""
        dev = self.devices.get(device_id)
        prop = dev.properties.get(prop_name) if dev is not None else None
        if prop is None or prop.write_state is not WriteState.PENDING:
            return
        prop.write_attempts = max(0, prop.write_attempts - 1)
        prop.next_write_ms = now_ms + self.writes.backoff_min_ms
        self.changes.properties.add((device_id, prop_name))
        if reason and prop.write_reason != reason:
            prop.write_reason = reason
            self._mark(device_id, {prop_name: DESIRED})

    def write_failed(self, device_id: str, prop_name: str, reason: str) -> None:
        """A write attempt failed; keep the reason. Retries continue until the last."""
        prop = self.device(device_id).properties[prop_name]
        if prop.write_state is WriteState.PENDING and prop.write_reason != reason:
            prop.write_reason = reason
            self.changes.properties.add((device_id, prop_name))
            self._mark(device_id, {prop_name: DESIRED})

    def _fail_write(self, device_id: str, prop: PropertyTwin, now_ms: int) -> None:
        prop.write_state = WriteState.FAILED
        prop.write_reason = (
            prop.write_reason
            or f"device did not report the desired value after {prop.write_attempts} attempts"
        )
        prop.next_write_ms = None
        self.changes.properties.add((device_id, prop.name))
        self._event(now_ms, device_id, prop.name, "write_failed", {"reason": prop.write_reason})
        self._mark(device_id, {prop.name: DESIRED})

    # ----------------------------------------------------------------- device state
    def set_state(self, device_id: str, state: str, now_ms: int) -> None:
        """Record a device's connection state (online, offline or unknown)."""
        state = state.strip().lower()
        if state not in DEVICE_STATES:
            raise TwinError(f"device {device_id}: state {state!r} is not one of {', '.join(DEVICE_STATES)}")
        dev = self.device(device_id)
        patch: dict[str, Any] = {}
        if state == "online":
            dev.last_online_ms = now_ms
            patch["lastOnlineTime"] = iso_ms(now_ms)
        if dev.state != state:
            self._event(now_ms, device_id, "", "state", {"from": dev.state, "to": state})
            dev.state = state
            patch["state"] = state
        if patch:
            self.changes.devices.add(device_id)
            self._compose(device_id, patch)

    def set_condition(
        self, device_id: str, ctype: str, status: str | None, reason: str, message: str, now_ms: int
    ) -> bool:
        """Set (or with ``status=None`` clear) a status condition of a device; only a
        change goes to the outbox. ``lastTransitionTime`` moves when the status does."""
        dev = self.device(device_id)
        current = dev.conditions.get(ctype)
        if status is None:
            if current is None:
                return False
            del dev.conditions[ctype]
            self.changes.devices.add(device_id)
            self._compose(device_id, {"conditions": {ctype: None}})
            return True
        if current is not None and (current["status"], current["reason"], current["message"]) == (
            status,
            reason,
            message,
        ):
            return False
        moved = current is None or current["status"] != status
        cond = {
            "type": ctype,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": iso_ms(now_ms) if moved else current["lastTransitionTime"],  # type: ignore[index]
        }
        dev.conditions[ctype] = cond
        self.changes.devices.add(device_id)
        self._compose(device_id, {"conditions": {ctype: cond}})
        return True

    def set_observed_generation(self, device_id: str, generation: int, store_id: str) -> None:
        """The cluster spec generation the gateway has seen for a device, reported with
        the store's id (the relay uses both to keep its own writes from echoing back)."""
        dev = self.device(device_id)
        if dev.observed_generation != generation:
            dev.observed_generation = generation
            self.changes.devices.add(device_id)
            self._compose(device_id, {"observedGeneration": generation, "edgeStore": store_id})

    def adopt_status(self, device_id: str, status: Mapping[str, Any] | None, now_ms: int) -> list[str]:
        """Take what the cloud's status knows that this twin does not: after a store was
        lost (new hardware, a wiped disk) versions would restart at 1 and the relay would
        ignore every value as older than what status holds. So for each property whose
        cloud version is at or above ours, versions continue above the cloud's; a value
        this twin has not reported yet is taken from the cloud (its value, timestamp and
        version), and one reported since the loss is renumbered above the cloud's version
        so that it wins. An edge desired value the cloud holds and this twin lacks is
        restored. Returns the properties adopted."""
        dev = self.devices.get(device_id)
        if dev is None or not isinstance(status, Mapping) or not dev.served:
            return []
        adopted: list[str] = []
        twins = status.get("twins")
        for entry in twins if isinstance(twins, list) else []:
            if not isinstance(entry, dict):
                continue
            prop = dev.properties.get(str(entry.get("propertyName", "")))
            if prop is None:
                continue
            reported = entry.get("reported")
            meta = reported.get("metadata") if isinstance(reported, dict) else None
            meta = meta if isinstance(meta, dict) else None
            cloud_version = _as_int((meta or {}).get("version"))
            behind = cloud_version is not None and (
                cloud_version > prop.last_version
                or (
                    cloud_version == prop.last_version
                    and prop.reported is not None
                    and value_to_text(prop.reported.value) != str(reported.get("value"))  # type: ignore[union-attr]
                )
            )
            if behind and cloud_version is not None:
                adopted.append(prop.name)
                if prop.reported is None:
                    try:
                        value = coerce_value(reported["value"], prop.type, prop.minimum, prop.maximum)  # type: ignore[index]
                    except (ValueRejected, KeyError, TypeError):
                        value = None
                    prop.last_version = cloud_version
                    if value is not None:
                        ts = _as_int((meta or {}).get("timestamp")) or now_ms
                        prop.reported = Reported(value, ts, cloud_version)
                        self.changes.public.add((device_id, prop.name))
                else:
                    prop.last_version = cloud_version + 1
                    prop.reported.version = prop.last_version
                    self.changes.public.add((device_id, prop.name))
                    self._mark(device_id, {prop.name: REPORTED})
                self.changes.properties.add((device_id, prop.name))
            desired = entry.get("observedDesired")
            if prop.desired is None and prop.writable and isinstance(desired, dict):
                self._restore_edge_desired(device_id, prop, desired, now_ms)
        return adopted

    def _restore_edge_desired(
        self, device_id: str, prop: PropertyTwin, desired: dict[str, Any], now_ms: int
    ) -> None:
        meta = desired.get("metadata") or {}
        if meta.get("origin") != "edge":
            return  # cloud desired values come back from the spec itself
        try:
            value = coerce_value(desired.get("value"), prop.type, prop.minimum, prop.maximum)
            stamp = Stamp.parse(str(meta.get("stamp", "")))
        except (ValueRejected, ValueError):
            return
        self.clock.observe(stamp)
        prop.desired = Desired(value, "edge", stamp, acked=True)
        if prop.reported is not None and _same(prop.reported.value, value):
            prop.write_state, prop.next_write_ms = WriteState.APPLIED, None
        else:
            prop.write_state, prop.write_attempts, prop.next_write_ms = WriteState.PENDING, 0, now_ms
        self.changes.properties.add((device_id, prop.name))

    # ----------------------------------------------------------------- outbox
    def outbox_acked(self, device_id: str, revision: int) -> bool:
        """The cloud accepted the device's patch at ``revision``. Edge desired writes in
        it are now known to the cloud. The entry leaves the outbox only if it has not
        changed since; returns whether it left."""
        dev = self.devices.get(device_id)
        if dev is not None:
            for name, prop in dev.properties.items():
                d = prop.desired
                if d is not None and not d.acked and d.outbox_revision <= revision:
                    d.acked = True
                    self.changes.properties.add((device_id, name))
        entry = self.outbox.get(device_id)
        if entry is None or entry.revision != revision:
            return False
        del self.outbox[device_id]
        self.changes.outbox.add(device_id)
        if dev is not None:
            for name in entry.props:
                pending = dev.properties.get(name)
                if pending is not None and pending.outbox_rev is not None:
                    pending.outbox_rev, pending.outbox_fields = None, 0
                    self.changes.properties.add((device_id, name))
        return True

    def seed_revisions(self, floor: int) -> None:
        """Start outbox revisions above ``floor`` (at start: the wall clock in
        microseconds, so no revision from before a restart comes back)."""
        self._revision = max(self._revision, floor)

    def restore_outbox(
        self, device_id: str, revision: int, device_patch: dict[str, Any], since_ms: int | None = None
    ) -> None:
        """Rebuild a device's pending patch from its stored parts: the device-level
        fields (with removed properties), and the current status of every property still
        pending. Each property entry sets whole objects, so the latest values are the
        composition. ``since_ms`` unknown (a store from before it was kept): the oldest
        revision bounds it (revisions start at the wall clock in microseconds)."""
        dev = self.device(device_id)
        device_patch = dict(device_patch)
        removed = {name for name, v in _mapping(device_patch.pop("twins", None)).items() if v is None}
        revisions = [revision]
        pending: dict[str, None] = {}
        for name, prop in dev.properties.items():
            if prop.outbox_rev is None:
                continue
            revisions.append(prop.outbox_rev)
            pending[name] = None
            prop.outbox_fields = prop.outbox_fields or ALL_FIELDS  # rows from before fields were kept
        removed -= set(dev.properties)
        if device_patch or pending or removed:
            bound = min((r for r in revisions if r), default=0) // 1000
            since = since_ms or (bound if bound > _SANE_WALL_MS else self._wall_ms())
            self.outbox[device_id] = OutboxEntry(dev, device_patch, max(revisions), since, pending, removed)
            self._revision = max(self._revision, max(revisions))

    def drain(self) -> Changes:
        """Return what changed since the last call and start afresh."""
        changes, self.changes = self.changes, Changes()
        return changes

    # ----------------------------------------------------------------- projections
    def status_patch(self, device_id: str) -> dict[str, Any]:
        """The whole status of a device as one patch (what a full resync would send)."""
        dev = self.device(device_id)
        twins: dict[str, Any] = {}
        for name, prop in dev.properties.items():
            if entry := property_status(prop):
                twins[name] = entry
        patch: dict[str, Any] = {"state": dev.state, "twins": twins}
        if dev.last_online_ms is not None:
            patch["lastOnlineTime"] = iso_ms(dev.last_online_ms)
        return patch

    # ----------------------------------------------------------------- internals
    def _entry(self, device_id: str) -> OutboxEntry:
        entry = self.outbox.get(device_id)
        if entry is None:
            # A new entry: its row records since when the device has had status pending.
            entry = OutboxEntry(self.devices[device_id], {}, 0, self._wall_ms())
            self.outbox[device_id] = entry
            self.changes.outbox.add(device_id)
        return entry

    def _bump(self, entry: OutboxEntry) -> None:
        self._revision += 1
        entry.revision = self._revision
        entry._patch = None

    def _compose(self, device_id: str, patch: dict[str, Any]) -> OutboxEntry:
        """Fold device-level status fields into the device's outbox entry (they live in
        its row in the store)."""
        entry = self._entry(device_id)
        compose_into(entry.device, patch)
        self._bump(entry)
        self.changes.outbox.add(device_id)
        return entry

    def _mark(self, device_id: str, marks: Mapping[str, int]) -> OutboxEntry:
        """Mark properties' status fields pending in the device's outbox entry."""
        entry = self._entry(device_id)
        self._bump(entry)
        revision, props, pending = entry.revision, entry.dev.properties, entry.props
        changed = self.changes.properties
        for name, fields in marks.items():
            prop = props[name]
            prop.outbox_rev = revision
            prop.outbox_fields |= fields
            pending[name] = None
            changed.add((device_id, name))
        if entry.removed:
            entry.removed.difference_update(marks)  # back in the model: values go again
        return entry

    def backlog(self) -> tuple[int, int | None]:
        """Devices with status not yet taken by the cloud, and since when (wall ms) the
        oldest of them has had it (None when there are none). O(1): entries are created
        in time order (see :meth:`order_outbox` for restored ones), so the first is the
        oldest."""
        if not self.outbox:
            return 0, None
        return len(self.outbox), next(iter(self.outbox.values())).since_ms

    def order_outbox(self) -> None:
        """After restoring entries from the store: put them in the order they were created."""
        self.outbox = dict(sorted(self.outbox.items(), key=lambda item: item[1].since_ms))

    def _record_conflict(self, prop: PropertyTwin, conflict: Conflict, now_ms: int) -> None:
        prop.last_conflict = conflict
        detail = {
            "winner": _desired_json(conflict.winner),
            "loser": _desired_json(conflict.loser),
            "message": conflict.describe(),
        }
        self._event(now_ms, conflict.device_id, conflict.property, "conflict", detail)
        self._compose(
            conflict.device_id,
            {
                "conditions": {
                    "DesiredConflict": {
                        "type": "DesiredConflict",
                        "status": "True",
                        "reason": "ConcurrentDesiredWrites",
                        "message": conflict.describe(),
                        "lastTransitionTime": iso_ms(now_ms),
                    }
                }
            },
        )

    def record_event(self, ts_ms: int, device_id: str, prop: str, kind: str, detail: dict[str, Any]) -> None:
        """Add an event of the caller's (e.g. skipped polling cycles) to the event log."""
        self._event(ts_ms, device_id, prop, kind, detail)

    def _event(self, ts_ms: int, device_id: str, prop: str, kind: str, detail: dict[str, Any]) -> None:
        self.changes.events.append(Event(ts_ms, device_id, prop, kind, detail))


def reported_status(prop: PropertyTwin) -> dict[str, Any]:
    """A property's reported value as Device status shows it (KubeEdge: strings)."""
    rep = prop.reported
    assert rep is not None
    return {
        "value": value_to_text(rep.value),
        "metadata": {
            "timestamp": str(rep.timestamp),
            "version": str(rep.version),
            "type": prop.type.value.lower(),
        },
    }


def desired_status(prop: PropertyTwin) -> dict[str, Any]:
    """The desired value in effect as Device status shows it (``observedDesired``)."""
    d = prop.desired
    assert d is not None
    meta = {
        "origin": d.origin,
        "stamp": str(d.stamp),
        "writeState": prop.write_state.value,
        "writeReason": prop.write_reason,
    }
    return {"value": value_to_text(d.value), "metadata": meta}


def property_status(prop: PropertyTwin) -> dict[str, Any]:
    """A property's whole status entry: reported and observedDesired, where present."""
    entry: dict[str, Any] = {}
    if prop.reported is not None:
        entry["reported"] = reported_status(prop)
    if prop.desired is not None:
        entry["observedDesired"] = desired_status(prop)
    if prop.read_error:
        entry["readError"] = prop.read_error
    return entry


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _as_int(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _wins(incoming: Desired, current: Desired) -> bool:
    """The conflict rule between the cloud and the edge: the later stamp wins; on equal
    stamps the cloud wins. A new spec value always replaces the previous spec value: the
    API server orders spec writes (its write times, kept to the second, may not)."""
    if incoming.origin == current.origin == "cloud":
        return True
    return (incoming.stamp, incoming.origin == "cloud") > (current.stamp, current.origin == "cloud")


def _same(a: Value, b: Value) -> bool:
    # bool is an int in Python: True == 1 must not count as the same value.
    return type(a) is type(b) and a == b


def _desired_json(d: Desired) -> dict[str, Any]:
    return {"value": d.value, "origin": d.origin, "stamp": str(d.stamp)}


def _short(raw: Any) -> Any:
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
    return text if len(text) <= 200 else text[:200] + "..."
