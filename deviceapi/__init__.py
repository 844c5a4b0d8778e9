"""The Device API shared by the gateway, the mappers' SDK and the cloud relay.

This package imports neither ``gateway`` nor ``cloud``: it holds what both sides need to
agree on (the ``edgetwin.io/v1alpha1`` object types and how property values are typed).
"""

from edgetwin.deviceapi.types import (
    API_GROUP,
    API_VERSION,
    AccessMode,
    Device,
    DeviceModel,
    DeviceProperty,
    ManifestError,
    ModelProperty,
    PropertyType,
    device_id,
)
from edgetwin.deviceapi.values import Value, ValueRejected, coerce_value, value_to_text

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "AccessMode",
    "Device",
    "DeviceModel",
    "DeviceProperty",
    "ManifestError",
    "ModelProperty",
    "PropertyType",
    "Value",
    "ValueRejected",
    "coerce_value",
    "device_id",
    "value_to_text",
]
