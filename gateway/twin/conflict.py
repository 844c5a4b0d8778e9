"""The conflict rule between cloud and edge desired writes (DESIGN.md, "Twin rules"), in
one place: per property the later hybrid logical clock stamp wins; on equal stamps the
cloud wins; a new spec value always replaces the previous spec value."""

from __future__ import annotations

from typing import Any

from edgetwin.deviceapi import Value
from edgetwin.gateway.twin.model import Desired


def wins(incoming: Desired, current: Desired) -> bool:
    """The conflict rule between the cloud and the edge: the later stamp wins; on equal
    stamps the cloud wins. A new spec value always replaces the previous spec value: the
    API server orders spec writes (its write times, kept to the second, may not)."""
    if incoming.origin == current.origin == "cloud":
        return True
    return (incoming.stamp, incoming.origin == "cloud") > (current.stamp, current.origin == "cloud")


def same(a: Value, b: Value) -> bool:
    # bool is an int in Python: True == 1 must not count as the same value.
    return type(a) is type(b) and a == b


def desired_json(d: Desired) -> dict[str, Any]:
    return {"value": d.value, "origin": d.origin, "stamp": str(d.stamp)}
