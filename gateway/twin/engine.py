"""The twin engine: the rules about reported and desired state, on ``writes`` and ``outbox``.

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

import time
from collections.abc import Callable, Mapping
from typing import Any

from edgetwin.deviceapi import Device, DeviceModel, Value, ValueRejected, coerce_value
from edgetwin.deviceapi.values import desired_value, value_to_text
from edgetwin.gateway.twin.conflict import desired_json, same, wins
from edgetwin.gateway.twin.hlc import HybridClock, Stamp
from edgetwin.gateway.twin.model import (
    DESIRED,
    DEVICE_STATES,
    EVENT_REPEAT_MS,
    MAX_REJECTED_LISTED,
    READ_ERROR,
    REPORTED,
    Changes,
    Conflict,
    Desired,
    DesiredOutcome,
    DesiredRejected,
    DeviceTwin,
    EventLimiter,
    Origin,
    PropertyTwin,
    Reported,
    ReportOutcome,
    TwinError,
    WriteState,
    as_int,
    canonical,
    clip,
    iso_ms,
)
from edgetwin.gateway.twin.outbox import OutboxEntry
from edgetwin.gateway.twin.writes import WritePolicy, WriteScheduling


class TwinEngine(WriteScheduling):
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
            entry.device_rev = entry.revision
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
                and same(prop.desired.value, value)
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
            raise self._desired_rejected(
                dev, prop_name, raw, origin, now_ms, f"not a property of DeviceModel {dev.model!r}"
            )
        try:
            value = desired_value(raw, prop.type, prop.writable, prop.minimum, prop.maximum)
        except ValueRejected as exc:
            raise self._desired_rejected(dev, prop_name, raw, origin, now_ms, exc.reason) from None
        if stamp is None:
            stamp = self.clock.now(now_ms)
        else:
            self.clock.observe(stamp)
        incoming = Desired(value, origin, stamp, acked=origin == "cloud")
        current = prop.desired
        if current is not None and not wins(incoming, current):
            conflict = None
            if (incoming.origin, incoming.stamp) != (current.origin, current.stamp) and not same(
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
            and not same(current.value, value)
        ):
            conflict = Conflict(device_id, prop_name, winner=incoming, loser=current)
            self._record_conflict(prop, conflict, now_ms)
        prop.desired = incoming
        if prop.reported is not None and same(prop.reported.value, value):
            prop.write_state, prop.write_reason, prop.next_write_ms = WriteState.APPLIED, "", None
        else:
            prop.write_state, prop.write_reason = WriteState.PENDING, ""
            prop.write_attempts, prop.next_write_ms = 0, now_ms
        self.changes.properties.add((device_id, prop_name))
        entry = self._mark(device_id, {prop_name: DESIRED})
        incoming.outbox_revision = entry.revision
        return DesiredOutcome(prop_name, True, incoming, conflict, prop.write_state is WriteState.PENDING)

    def _desired_rejected(
        self, dev: DeviceTwin, prop_name: str, raw: Any, origin: Origin, now_ms: int, reason: str
    ) -> DesiredRejected:
        """The error for a refused desired value, also put in the event log (at most once
        per :data:`EVENT_REPEAT_MS` per property, the rest counted in the next event), so
        ``edgetwin twin events`` shows why a write from anywhere was refused."""
        name = clip(prop_name)
        # One key per property of the model, one for all names outside it: the limiter
        # stays bounded by devices x properties whatever names a client makes up.
        key = (dev.id, f"desired:{name}" if prop_name in dev.properties else "desired:")
        if self._limiter.allow(key, now_ms):
            detail = {"reason": reason, "desired": clip(str(raw), 200), "origin": origin}
            self._event(now_ms, dev.id, name, "rejected", self._limiter.annotate(key, detail))
        return DesiredRejected(dev.id, name, reason)

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
            and (p.reported is None or not same(p.reported.value, p.desired.value))
        }

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
            cloud_version = as_int((meta or {}).get("version"))
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
                        ts = as_int((meta or {}).get("timestamp")) or now_ms
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
        if prop.reported is not None and same(prop.reported.value, value):
            prop.write_state, prop.next_write_ms = WriteState.APPLIED, None
        else:
            prop.write_state, prop.write_attempts, prop.next_write_ms = WriteState.PENDING, 0, now_ms
        self.changes.properties.add((device_id, prop.name))

    def _record_conflict(self, prop: PropertyTwin, conflict: Conflict, now_ms: int) -> None:
        prop.last_conflict = conflict
        detail = {
            "winner": desired_json(conflict.winner),
            "loser": desired_json(conflict.loser),
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
