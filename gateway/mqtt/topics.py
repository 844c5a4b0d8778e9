"""Every MQTT topic the gateway uses, in one place (docs/mqtt.md documents them).

KubeEdge-compatible device topics use the device id ``{namespace}.{name}``; edgetwin's own
topics for local apps live under ``edgetwin/{node}/``.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "$hw/events/device/"

# mosquitto's running count of messages it dropped (queue limits, a client's session
# full): updates it acknowledged to a publisher and then lost. Published every
# sys_interval (10 s by default); brokers without it simply never send it.
BROKER_DROPPED = "$SYS/broker/publish/messages/dropped"

# What the gateway subscribes to, with the QoS of each subscription.
SUBSCRIPTIONS: tuple[tuple[str, int], ...] = (
    (PREFIX + "+/twin/update", 1),
    (PREFIX + "+/twin/get", 1),
    (PREFIX + "+/state/update", 1),
    (BROKER_DROPPED, 0),
)


def subscriptions(node: str) -> tuple[tuple[str, int], ...]:
    """Everything the gateway of ``node`` subscribes to."""
    return (*SUBSCRIPTIONS, (membership_get(node), 1))


# KubeEdge's node membership topics: which devices this node serves.
def membership_updated(node: str) -> str:
    """Devices added to or removed from the node (not retained, QoS 1)."""
    return f"$hw/events/node/{node}/membership/updated"


def membership_get(node: str) -> str:
    return f"$hw/events/node/{node}/membership/get"


def membership_get_result(node: str) -> str:
    return f"$hw/events/node/{node}/membership/get/result"


TWIN_UPDATE = "twin/update"
TWIN_GET = "twin/get"
STATE_UPDATE = "state/update"
INBOUND_ACTIONS = (TWIN_UPDATE, TWIN_GET, STATE_UPDATE)


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    device_id: str
    action: str  # one of INBOUND_ACTIONS


def parse_inbound(topic: str) -> DeviceTopic | None:
    """``$hw/events/device/{id}/{action}`` -> DeviceTopic, or None if not ours."""
    if not topic.startswith(PREFIX):
        return None
    rest = topic[len(PREFIX) :]
    dev_id, sep, action = rest.partition("/")
    if not sep or not dev_id or action not in INBOUND_ACTIONS:
        return None
    return DeviceTopic(dev_id, action)


def twin_update(device_id: str) -> str:
    return f"{PREFIX}{device_id}/twin/update"


def twin_update_result(device_id: str) -> str:
    return f"{PREFIX}{device_id}/twin/update/result"


def twin_update_delta(device_id: str) -> str:
    return f"{PREFIX}{device_id}/twin/update/delta"


def twin_get(device_id: str) -> str:
    return f"{PREFIX}{device_id}/twin/get"


def twin_get_result(device_id: str) -> str:
    return f"{PREFIX}{device_id}/twin/get/result"


def state_update(device_id: str) -> str:
    return f"{PREFIX}{device_id}/state/update"


def state_update_result(device_id: str) -> str:
    return f"{PREFIX}{device_id}/state/update/result"


def property_value(node: str, namespace: str, name: str, prop: str) -> str:
    """Retained JSON {value, timestamp, version} of one reported property."""
    return f"edgetwin/{node}/{namespace}/{name}/{prop}"


def device_values(node: str, namespace: str, name: str) -> str:
    """Retained: every reported value of the device in one document (``mqtt.values``
    per_device or both). Property names never start with ``_``, so no property topic
    can collide with it."""
    return f"edgetwin/{node}/{namespace}/{name}/_values"


def device_state(node: str, namespace: str, name: str) -> str:
    """Retained JSON: the device's state (online/offline), readiness and conditions.
    Property names cannot start with "_", so this never collides with a property."""
    return f"edgetwin/{node}/{namespace}/{name}/_state"


def device_spec(node: str, namespace: str, name: str) -> str:
    """Retained JSON: the definition the device is served with (spec and model), for
    external mappers to configure themselves."""
    return f"edgetwin/{node}/{namespace}/{name}/_spec"


def device_list(node: str) -> str:
    """Retained JSON: every device of the node, its source and readiness."""
    return f"edgetwin/{node}/devices"


def gateway_status(node: str) -> str:
    """Retained "online"/"offline" (the latter as the connection's will)."""
    return f"edgetwin/{node}/gateway/status"


def gateway_metrics(node: str) -> str:
    """Retained JSON counters of the gateway, refreshed every few seconds."""
    return f"edgetwin/{node}/gateway/metrics"
