"""The outbox (DESIGN.md, "Twin rules"): per device one pending status patch that
composes every change not yet acknowledged by the cloud, bounded by the properties, not
by time offline. :class:`OutboxTwins` is the engine's base: the twins, what changed, and
the outbox entries with their revisions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgetwin.gateway.twin.model import (
    ALL_FIELDS,
    DESIRED,
    READ_ERROR,
    REPORTED,
    SANE_WALL_MS,
    Changes,
    DeviceTwin,
    Event,
    UnknownDevice,
    iso_ms,
    mapping,
)
from edgetwin.gateway.twin.status import desired_status, property_status, reported_status
from edgetwin.sync.patch import compose_into


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
    # The revision of the last change of a device-level field or of a removal: a stream
    # that sent the entry at a later revision need not send them again.
    device_rev: int = 0
    _patch: dict[str, Any] | None = None

    @property
    def urgent(self) -> bool:
        """Whether the patch carries device state, conditions or a desired value's
        acknowledgement (sent before reported values), read from the marks without
        building the patch: a backlog of thousands of devices waiting for the link is
        ordered without holding all their patches in memory."""
        if "state" in self.device or "conditions" in self.device:
            return True
        properties = self.dev.properties
        for name in self.props:
            prop = properties.get(name)
            if prop is not None and prop.outbox_fields & DESIRED and prop.desired is not None:
                return True
        return False

    @property
    def patch(self) -> dict[str, Any]:
        """The Device status merge patch (``twins`` keyed by property name)."""
        if self._patch is None:
            self._patch = self.patch_since(0)
        return self._patch

    def patch_since(self, revision: int) -> dict[str, Any]:
        """What changed after ``revision``: the properties marked later and the
        device-level fields and removals if any of them changed later (all of it for 0).
        Merged onto the patch sent at ``revision`` it gives :attr:`patch`, so a stream
        that delivers in order sends each change once (gateway/uplink_stream.py)."""
        if revision <= 0 and self._patch is not None:
            return self._patch
        device_too = self.device_rev > revision or revision <= 0
        patch = dict(self.device) if device_too else {}
        twins: dict[str, Any] = {}
        properties = self.dev.properties
        for name in self.props:
            prop = properties.get(name)
            if prop is None or (revision > 0 and prop.outbox_rev is not None and prop.outbox_rev <= revision):
                continue
            fields, entry = prop.outbox_fields, {}  # type: int, dict[str, Any]
            if fields & REPORTED and prop.reported is not None:
                entry["reported"] = reported_status(prop)
            if fields & DESIRED and prop.desired is not None:
                entry["observedDesired"] = desired_status(prop)
            if fields & READ_ERROR:
                entry["readError"] = prop.read_error or None
            twins[name] = entry
        if device_too:
            for name in self.removed:
                twins[name] = None
        if twins:
            patch["twins"] = twins
        return patch


class OutboxTwins:
    """The twins of one gateway and their outbox; the rules build on it (``engine``)."""

    devices: dict[str, DeviceTwin]
    outbox: dict[str, OutboxEntry]
    changes: Changes
    _revision: int
    _wall_ms: Callable[[], int]

    def now_ms(self) -> int:
        """The wall clock (ms) that the outbox's times are read from."""
        return self._wall_ms()

    def outbox_acked(self, device_id: str, revision: int) -> bool:
        """The cloud accepted the device's patch at ``revision``. Edge desired writes in
        it are now known to the cloud. The entry leaves the outbox only if it has not
        changed since; returns whether it left."""
        dev = self.devices.get(device_id)
        self._desired_known(device_id, revision)
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

    def outbox_progress(self, device_id: str, revision: int, taken_ms: int) -> None:
        """The cloud accepted the device's patch at ``revision``, an earlier one than its
        entry's (a newer change is on its way), taken at ``taken_ms`` (wall ms): edge
        desired writes in it are known to the cloud, and the entry is pending only since
        then, since every later change is younger. Without this a device changing faster
        than answers come back would stay in the outbox with the age of its first change,
        growing for good. The entry moves to the end of the time order (entries created
        since ``taken_ms`` are ahead of it), so the first entry's time, what
        :meth:`backlog` reads, is the oldest or at most one answer's round trip younger;
        a device stuck behind a fast-changing one still comes to the front. The new
        ``since_ms`` is stored with the entry's next change (one is on its way); a restart
        before it keeps the older time."""
        self._desired_known(device_id, revision)
        entry = self.outbox.get(device_id)
        if entry is None or entry.revision <= revision or taken_ms <= entry.since_ms:
            return
        entry.since_ms = taken_ms
        del self.outbox[device_id]
        self.outbox[device_id] = entry

    def _desired_known(self, device_id: str, revision: int) -> None:
        """Edge desired writes in the patch at ``revision`` are known to the cloud."""
        dev = self.devices.get(device_id)
        if dev is None:
            return
        for name, prop in dev.properties.items():
            d = prop.desired
            if d is not None and not d.acked and d.outbox_revision <= revision:
                d.acked = True
                self.changes.properties.add((device_id, name))

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
        removed = {name for name, v in mapping(device_patch.pop("twins", None)).items() if v is None}
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
            since = since_ms or (bound if bound > SANE_WALL_MS else self._wall_ms())
            self.outbox[device_id] = OutboxEntry(
                dev, device_patch, max(revisions), since, pending, removed, device_rev=max(revisions)
            )
            self._revision = max(self._revision, max(revisions))

    def drain(self) -> Changes:
        """Return what changed since the last call and start afresh."""
        changes, self.changes = self.changes, Changes()
        return changes

    def device(self, device_id: str) -> DeviceTwin:
        try:
            return self.devices[device_id]
        except KeyError:
            raise UnknownDevice(device_id) from None

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
        entry.device_rev = entry.revision
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
        oldest, or within an answer's round trip of it (see :meth:`outbox_progress`)."""
        if not self.outbox:
            return 0, None
        return len(self.outbox), next(iter(self.outbox.values())).since_ms

    def order_outbox(self) -> None:
        """After restoring entries from the store: put them in the order they were created."""
        self.outbox = dict(sorted(self.outbox.items(), key=lambda item: item[1].since_ms))

    def record_event(self, ts_ms: int, device_id: str, prop: str, kind: str, detail: dict[str, Any]) -> None:
        """Add an event of the caller's (e.g. skipped polling cycles) to the event log."""
        self._event(ts_ms, device_id, prop, kind, detail)

    def _event(self, ts_ms: int, device_id: str, prop: str, kind: str, detail: dict[str, Any]) -> None:
        self.changes.events.append(Event(ts_ms, device_id, prop, kind, detail))
