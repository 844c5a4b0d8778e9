"""The twin's types: a device's properties with their reported and desired state, what
changed (:class:`Changes`), the engine's errors and answers. Data only; the rules that
change them are in ``engine``, ``writes``, ``outbox`` and ``conflict``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from edgetwin.deviceapi import PropertyType, Value
from edgetwin.deviceapi.values import value_to_text
from edgetwin.gateway.twin.hlc import Stamp

Origin = Literal["cloud", "edge"]
ORIGINS: tuple[Origin, ...] = ("cloud", "edge")
DEVICE_STATES = ("online", "offline", "unknown")

# A message may name thousands of unknown properties: answers list at most this many.
MAX_REJECTED_LISTED = 20
# A property's read errors (and rejected values) reach the event log when they change, at
# most once per this many ms per property; the others are counted in the next event.
EVENT_REPEAT_MS = 600_000


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


SANE_WALL_MS = 978_307_200_000  # 2001: anything earlier is not a wall clock reading


def clip(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters (names and reasons from peers are unbounded)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def canonical(value: Value) -> str:
    return json.dumps(value, sort_keys=True)


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_int(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def short(raw: Any) -> Any:
    text = raw if isinstance(raw, str) else json.dumps(raw, default=str)
    return text if len(text) <= 200 else text[:200] + "..."
