"""How a twin shows in Device status (KubeEdge's layout: values as strings, with their
metadata): the views the outbox composes and a full resync sends."""

from __future__ import annotations

from typing import Any

from edgetwin.deviceapi.values import value_to_text
from edgetwin.gateway.twin.model import PropertyTwin


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
