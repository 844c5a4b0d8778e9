"""Desired writes to devices: which attempts are due, with exponential backoff and
jitter, paused while a device cannot be reached, until the device reports the desired
value (applied) or the attempts run out (failed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgetwin.gateway.twin.model import DESIRED, PropertyTwin, WriteRequest, WriteState
from edgetwin.gateway.twin.outbox import OutboxTwins

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


class WriteScheduling(OutboxTwins):
    """Hands out desired writes; the engine's layer above the outbox."""

    writes: WritePolicy
    _jitter: Callable[[], float]

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
