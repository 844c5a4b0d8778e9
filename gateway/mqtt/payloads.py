"""MQTT payloads, parsed and built in one place (docs/mqtt.md shows examples).

Inbound payloads follow KubeEdge's device twin messages, so existing mappers work:

    {"event_id": "...", "timestamp": 1732640000000,
     "twin": {"temperature": {"actual": {"value": "23.5"}, "metadata": {"type": "float"}}}}

``expected`` in place of (or beside) ``actual`` sets an edge-local desired value.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgetwin.deviceapi.values import value_to_text
from edgetwin.gateway.twin.model import DeviceTwin, PropertyTwin, Reported


class PayloadError(ValueError):
    """A payload is not acceptable; ``reason`` names what is wrong, ``kind`` counts it."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind  # not_json | bad_shape | oversize
        self.reason = reason


@dataclass(slots=True)
class TwinUpdate:
    event_id: str
    timestamp: int | None
    actual: dict[str, Any] = field(default_factory=dict)
    expected: dict[str, Any] = field(default_factory=dict)


def decode_json(payload: bytes) -> Any:
    """``json.loads`` that fails only with :class:`PayloadError`, whatever a peer sends.

    Beyond syntax errors and invalid UTF-8, the standard parser raises ``RecursionError``
    for deep nesting (``[[[[...``) and ``ValueError`` for integers of more than 4,300
    digits; left uncaught, either escapes the message handler, the message is never
    acknowledged and the broker redelivers it forever (a poison message)."""
    try:
        return json.loads(payload)
    except RecursionError:
        raise PayloadError("bad_shape", "payload nests arrays or objects too deeply") from None
    except UnicodeDecodeError as exc:
        reason = f"payload is not UTF-8 JSON: {exc.reason} at byte {exc.start}"
        raise PayloadError("not_json", reason) from None
    except json.JSONDecodeError as exc:
        raise PayloadError("not_json", f"payload is not JSON: {exc}") from None
    except ValueError as exc:  # the int digit limit (CVE-2020-10735 guard), and kin
        reason = str(exc).split(";")[0]
        raise PayloadError("bad_shape", f"payload holds a number Python will not parse: {reason}") from None


def _load(payload: bytes, max_size: int) -> dict[str, Any]:
    if len(payload) > max_size:
        raise PayloadError("oversize", f"payload is {len(payload)} bytes, more than {max_size}")
    doc = decode_json(payload)
    if not isinstance(doc, dict):
        raise PayloadError("bad_shape", f"payload must be a JSON object, got {type(doc).__name__}")
    return doc


def _event_id(doc: dict[str, Any]) -> str:
    event_id = doc.get("event_id", "")
    if not isinstance(event_id, str):
        raise PayloadError("bad_shape", "event_id must be a string")
    return event_id[:128]


# Year 9999: later "timestamps" are garbage and would overflow date conversions.
MAX_TIMESTAMP_MS = 253_402_300_799_999


def _timestamp(doc: dict[str, Any]) -> int | None:
    ts = doc.get("timestamp")
    if ts is None:
        return None
    if (
        isinstance(ts, bool)
        or not isinstance(ts, int | float)
        # The range first: math.isfinite() of an int beyond a float's range overflows.
        or not 0 <= ts <= MAX_TIMESTAMP_MS
        or not math.isfinite(ts)
    ):
        raise PayloadError("bad_shape", f"timestamp must be milliseconds since the epoch, got {ts!r:.40}")
    return int(ts)


def event_id_of(payload: bytes) -> str:
    """Best-effort event_id of a payload we are rejecting, to answer with it."""
    try:
        doc = decode_json(payload)
    except PayloadError:
        return ""
    event_id = doc.get("event_id", "") if isinstance(doc, dict) else ""
    return event_id[:128] if isinstance(event_id, str) else ""


def parse_twin_update(payload: bytes, max_size: int) -> TwinUpdate:
    doc = _load(payload, max_size)
    update = TwinUpdate(_event_id(doc), _timestamp(doc))
    twin = doc.get("twin")
    if not isinstance(twin, dict) or not twin:
        raise PayloadError("bad_shape", 'missing "twin": {"<property>": {"actual": {"value": ...}}}')
    for name, entry in twin.items():
        if not isinstance(entry, dict):
            raise PayloadError("bad_shape", f"twin.{name} must be an object")
        for part, target in (("actual", update.actual), ("expected", update.expected)):
            if part not in entry:
                continue
            holder = entry[part]
            if not isinstance(holder, dict) or "value" not in holder:
                raise PayloadError("bad_shape", f'twin.{name}.{part} must be {{"value": ...}}')
            value = holder["value"]
            if isinstance(value, dict | list):
                raise PayloadError("bad_shape", f"twin.{name}.{part}.value must be a scalar")
            target[name] = value
        if name not in update.actual and name not in update.expected:
            raise PayloadError("bad_shape", f"twin.{name} has neither actual nor expected")
    return update


def parse_twin_get(payload: bytes, max_size: int) -> str:
    """Returns the event_id; an empty payload is a valid request."""
    if not payload:
        return ""
    return _event_id(_load(payload, max_size))


def parse_state_update(payload: bytes, max_size: int) -> tuple[str, str]:
    doc = _load(payload, max_size)
    state = doc.get("state")
    if not isinstance(state, str):
        raise PayloadError("bad_shape", 'missing "state": "online" | "offline" | "unknown"')
    return _event_id(doc), state


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def new_event_id() -> str:
    return uuid.uuid4().hex


def _actual(prop: PropertyTwin, rep: Reported) -> dict[str, Any]:
    return {
        "actual": {"value": value_to_text(rep.value), "metadata": {"timestamp": rep.timestamp}},
        "metadata": {"type": prop.type.value.lower(), "version": rep.version},
    }


def update_result(
    event_id: str,
    now_ms: int,
    dev: DeviceTwin,
    accepted: dict[str, Reported],
    rejected: dict[str, str],
    desired: dict[str, dict[str, Any]] | None = None,
) -> bytes:
    twin = {name: _actual(dev.properties[name], rep) for name, rep in accepted.items()}
    for name, info in (desired or {}).items():
        twin.setdefault(name, {"metadata": {"type": dev.properties[name].type.value.lower()}})
        twin[name]["expected"] = info
    doc: dict[str, Any] = {"event_id": event_id, "timestamp": now_ms, "twin": twin}
    if rejected:
        doc["code"] = 400
        doc["rejected"] = rejected
    return _dumps(doc)


def duplicate_result(event_id: str, now_ms: int) -> bytes:
    """The answer to a redelivered update whose first answer was too large to keep."""
    return _dumps({"event_id": event_id, "timestamp": now_ms, "duplicate": True})


def error_result(event_id: str, now_ms: int, code: int, reason: str) -> bytes:
    return _dumps({"event_id": event_id, "timestamp": now_ms, "code": code, "reason": reason})


def _full_twin(dev: DeviceTwin) -> dict[str, Any]:
    twin: dict[str, Any] = {}
    for name, prop in dev.properties.items():
        entry: dict[str, Any] = {"metadata": {"type": prop.type.value.lower()}}
        if prop.reported is not None:
            entry = _actual(prop, prop.reported)
        if prop.read_error:
            entry["metadata"]["readError"] = prop.read_error
        if prop.desired is not None:
            d = prop.desired
            entry["expected"] = {
                "value": value_to_text(d.value),
                "metadata": {
                    "timestamp": d.stamp.wall_ms,
                    "origin": d.origin,
                    "stamp": str(d.stamp),
                    "writeState": prop.write_state.value,
                },
            }
        twin[name] = entry
    return twin


def get_result(event_id: str, now_ms: int, dev: DeviceTwin) -> bytes:
    return _dumps({"event_id": event_id, "timestamp": now_ms, "twin": _full_twin(dev)})


def delta(now_ms: int, dev: DeviceTwin, deltas: dict[str, Any]) -> bytes:
    return _dumps(
        {
            "event_id": new_event_id(),
            "timestamp": now_ms,
            "twin": _full_twin(dev),
            "delta": {name: value_to_text(v) for name, v in deltas.items()},
        }
    )


def state_result(event_id: str, now_ms: int, dev: DeviceTwin) -> bytes:
    doc: dict[str, Any] = {
        "event_id": event_id,
        "timestamp": now_ms,
        "device": {"state": dev.state},
    }
    if dev.last_online_ms is not None:
        doc["device"]["last_online_time"] = dev.last_online_ms
    return _dumps(doc)


def property_value(prop: PropertyTwin) -> bytes:
    """The retained document of one property: its latest reported value, and why its
    last read failed when it did (``readError``, until the next accepted value)."""
    doc: dict[str, Any] = {}
    rep = prop.reported
    if rep is not None:
        doc = {"value": rep.value, "timestamp": rep.timestamp, "version": rep.version}
    if prop.read_error:
        doc["readError"] = prop.read_error
    return _dumps(doc)


def device_values(props: Iterable[PropertyTwin]) -> bytes:
    """The retained document of all of a device's values: each property as
    :func:`property_value` writes it, keyed by name (properties never read are left out)."""
    doc: dict[str, Any] = {}
    for prop in props:
        rep = prop.reported
        if rep is None and not prop.read_error:
            continue
        entry: dict[str, Any] = {}
        if rep is not None:
            entry = {"value": rep.value, "timestamp": rep.timestamp, "version": rep.version}
        if prop.read_error:
            entry["readError"] = prop.read_error
        doc[prop.name] = entry
    return _dumps(doc)


def twin_set_request(event_id: str, now_ms: int, values: dict[str, Any]) -> bytes:
    """What ``edgetwin twin set`` publishes: an edge-local desired write."""
    return _dumps(
        {
            "event_id": event_id,
            "timestamp": now_ms,
            "twin": {name: {"expected": {"value": v}} for name, v in values.items()},
        }
    )


# ----------------------------------------------------------------- device lifecycle
def device_state(dev: DeviceTwin) -> bytes:
    """``edgetwin/{node}/{ns}/{name}/_state``: state, readiness and conditions."""
    ready = dev.conditions.get("Ready")
    doc: dict[str, Any] = {
        "state": dev.state,
        "ready": ready["status"] == "True" if ready else None,
        "served": dev.served,
        "conditions": [dev.conditions[k] for k in sorted(dev.conditions)],
    }
    if dev.last_online_ms is not None:
        doc["lastOnlineTime"] = dev.last_online_ms
    return _dumps(doc)


def device_spec(definition: Any) -> bytes:
    """``edgetwin/{node}/{ns}/{name}/_spec``: what the device is served with (a
    gateway.registry.Definition): its source, spec and model."""
    return _dumps(
        {
            "source": definition.source,
            "generation": definition.generation,
            "spec": definition.device.spec.model_dump(mode="json", exclude_none=True),
            "model": definition.model.spec.model_dump(mode="json", exclude_none=True),
        }
    )


def device_list(devices: list[dict[str, Any]]) -> bytes:
    """``edgetwin/{node}/devices``: the node's devices."""
    return _dumps({"devices": devices})


def _member(dev: DeviceTwin) -> dict[str, Any]:
    return {"id": dev.id, "name": dev.name, "namespace": dev.namespace, "state": dev.state}


def membership_updated(now_ms: int, added: list[DeviceTwin], removed: list[tuple[str, str]]) -> bytes:
    """KubeEdge's membership/updated event: devices added to and removed from the node."""
    return _dumps(
        {
            "event_id": new_event_id(),
            "timestamp": now_ms,
            "added_devices": [_member(d) for d in added],
            "removed_devices": [{"id": dev_id, "name": name} for dev_id, name in removed],
        }
    )


def membership_get_result(event_id: str, now_ms: int, devices: list[DeviceTwin]) -> bytes:
    return _dumps({"event_id": event_id, "timestamp": now_ms, "devices": [_member(d) for d in devices]})
