"""Object types of the Device API ``edgetwin.io/v1alpha1``: ``DeviceModel`` and ``Device``.

Modeled on KubeEdge's ``devices.kubeedge.io/v1beta1`` so that its users recognise them:
a model lists typed properties; a device points at a model, is bound to one node, names
the protocol that serves it (none: an external mapper over MQTT), and carries per
property visitor config, desired value and cycles. ``status`` is written by edgetwin
only and is not part of what a manifest may set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_GROUP = "edgetwin.io"
API_VERSION = f"{API_GROUP}/v1alpha1"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# Property names become MQTT topic levels: no '/', '+', '#', no leading '$'.
_PROPERTY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1}


class ManifestError(ValueError):
    """A Device or DeviceModel is invalid. ``where`` names the object (and file), and the
    message names the field and what is wrong with it. ``located``: every problem found
    in the files read, as (file, problem with its line and column), one line each."""

    def __init__(
        self, where: str, problem: str, located: list[tuple[str, Any]] | None = None, path: str = ""
    ) -> None:
        from edgetwin.deviceapi.problems import MAX_PROBLEMS

        if located:
            lines = [p.text(file) for file, p in located[:MAX_PROBLEMS]]
            if len(located) > MAX_PROBLEMS:
                lines.append(f"... and {len(located) - MAX_PROBLEMS} more problems")
            super().__init__("\n".join(lines))
        else:
            super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem
        self.located = located or []
        # The key path the problem is about (``spec.properties[0].name``), when it names
        # one: the message starts with it, and a loader places it at its line.
        self.path = path


def first_problem(exc: ValidationError, unknown: str = "is not a known field") -> tuple[str, str]:
    """The first error of a pydantic validation as (dotted key, problem), worded for
    people: missing keys are "required", extra keys are ``unknown``."""
    from edgetwin.deviceapi.problems import key_path

    err = exc.errors()[0]
    key = key_path(err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "is required"
    elif err["type"] == "extra_forbidden":
        msg = unknown
    elif isinstance(err.get("input"), str | int | float) and not isinstance(err.get("input"), bool):
        shown = repr(err["input"])
        if len(shown) <= 40 and shown not in msg:
            msg = f"{msg}, got {shown}"
    return key, msg


class PropertyType(StrEnum):
    INT = "INT"
    FLOAT = "FLOAT"
    DOUBLE = "DOUBLE"
    STRING = "STRING"
    BOOLEAN = "BOOLEAN"
    BYTES = "BYTES"


class AccessMode(StrEnum):
    READ_ONLY = "ReadOnly"
    READ_WRITE = "ReadWrite"


def check_host_port(value: str, hint: str) -> str:
    """``value`` if it is ``HOST:PORT`` with a port 0-65535 (no default port is ever
    assumed); else ValueError saying "expected HOST:PORT {hint}"."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT {hint}, got {value!r}")
    return value


def parse_duration_ms(raw: Any) -> int:
    """A duration as milliseconds: an integer is milliseconds (as in KubeEdge); text may
    carry a unit (``500ms``, ``10s``, ``1.5m``, ``1h``, ``7d``)."""
    if isinstance(raw, bool):
        raise ValueError("expected a duration such as 1000 (ms) or '10s'")
    if isinstance(raw, int | float):
        ms = int(raw)
    elif isinstance(raw, str) and (match := _DURATION.match(raw)):
        ms = int(float(match.group(1)) * _UNIT_MS[match.group(2)])
    else:
        raise ValueError(f"expected a duration such as 1000 (ms) or '10s', got {raw!r}")
    if ms <= 0:
        raise ValueError(f"a duration must be positive, got {raw!r}")
    return ms


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ObjectMeta(BaseModel):
    """The part of Kubernetes ObjectMeta edgetwin uses; other keys are kept, not used."""

    model_config = ConfigDict(extra="allow")

    name: str
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    resourceVersion: str | None = None
    uid: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DNS_SUBDOMAIN.match(v):
            raise ValueError(f"{v!r} is not a lowercase DNS-1123 name")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"{v!r} is not a lowercase DNS-1123 label")
        return v


def _check_property_name(v: str) -> str:
    if not _PROPERTY_NAME.match(v):
        raise ValueError(
            f"{v!r} is not a valid property name (letters, digits, '_', '.', '-'; "
            "at most 63; it becomes an MQTT topic level)"
        )
    return v


def _check_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"property {name!r} is listed twice")
        seen.add(name)


def _limit(v: Any) -> float | None:
    # KubeEdge writes minimum/maximum as strings; accept both.
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {v!r}") from None


class ModelProperty(_Strict):
    name: str
    description: str = ""
    type: PropertyType
    accessMode: AccessMode = AccessMode.READ_ONLY
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_property_name(v)

    @field_validator("minimum", "maximum", mode="before")
    @classmethod
    def _limits(cls, v: Any) -> float | None:
        return _limit(v)

    @model_validator(mode="after")
    def _range(self) -> ModelProperty:
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(f"minimum {self.minimum:g} is above maximum {self.maximum:g}")
        return self

    @property
    def writable(self) -> bool:
        return self.accessMode is AccessMode.READ_WRITE


class DeviceModelSpec(_Strict):
    protocol: str | None = None
    properties: list[ModelProperty] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> DeviceModelSpec:
        _check_unique(p.name for p in self.properties)
        return self


class DeviceModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["edgetwin.io/v1alpha1"]
    kind: Literal["DeviceModel"]
    metadata: ObjectMeta
    spec: DeviceModelSpec

    def get_property(self, name: str) -> ModelProperty | None:
        for prop in self.spec.properties:
            if prop.name == name:
                return prop
        return None


class ModelRef(_Strict):
    name: str


class DesiredValue(_Strict):
    value: Any
    metadata: dict[str, str] = Field(default_factory=dict)


class Visitor(_Strict):
    protocolName: str | None = None
    configData: dict[str, Any] = Field(default_factory=dict)


class DeviceProperty(_Strict):
    name: str
    desired: DesiredValue | None = None
    visitors: Visitor | None = None
    collectCycle: int | None = None
    reportCycle: int | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_property_name(v)

    @field_validator("collectCycle", "reportCycle", mode="before")
    @classmethod
    def _cycles(cls, v: Any) -> int | None:
        return None if v is None else parse_duration_ms(v)


class ProtocolConfig(_Strict):
    protocolName: str
    configData: dict[str, Any] = Field(default_factory=dict)


class DeviceSpec(_Strict):
    deviceModelRef: ModelRef
    nodeName: str
    protocol: ProtocolConfig | None = None
    properties: list[DeviceProperty] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> DeviceSpec:
        _check_unique(p.name for p in self.properties)
        # A visitor names the protocol it is written for (KubeEdge's field); one for
        # another protocol than the device's would be read as if it were this one's.
        protocol = self.protocol.protocolName if self.protocol is not None else None
        for i, prop in enumerate(self.properties):
            named = prop.visitors.protocolName if prop.visitors is not None else None
            if named is not None and named != protocol:
                raise ValueError(
                    f"properties[{i}].visitors.protocolName: {named!r} is not the device's protocol "
                    f"(spec.protocol.protocolName: {protocol!r})"
                )
        return self


class Device(BaseModel):
    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["edgetwin.io/v1alpha1"]
    kind: Literal["Device"]
    metadata: ObjectMeta
    spec: DeviceSpec
    # Status is edgetwin's to write; a manifest may carry one (e.g. from kubectl get -o
    # yaml) and it is ignored on load.
    status: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return device_id(self.metadata.namespace, self.metadata.name)

    def get_property(self, name: str) -> DeviceProperty | None:
        for prop in self.spec.properties:
            if prop.name == name:
                return prop
        return None


def device_id(namespace: str, name: str) -> str:
    """The id a device goes by on MQTT: ``{namespace}.{name}``. A namespace is a DNS label
    (no dots), so the first dot splits the id unambiguously."""
    return f"{namespace}.{name}"


def split_device_id(dev_id: str) -> tuple[str, str]:
    """Inverse of :func:`device_id`; raises ``ValueError`` for an id without a dot."""
    namespace, sep, name = dev_id.partition(".")
    if not sep or not namespace or not name:
        raise ValueError(f"device id {dev_id!r} is not of the form namespace.name")
    return namespace, name


def check_device_against_model(device: Device, model: DeviceModel) -> None:
    """Cross-object rules: every device property exists in the model, and only writable
    properties may carry a desired value (which must fit the property's type)."""
    from edgetwin.deviceapi.values import ValueRejected, coerce_value

    where = f"Device {device.metadata.namespace}/{device.metadata.name}"
    for index, prop in enumerate(device.spec.properties):
        model_prop = model.get_property(prop.name)
        if model_prop is None:
            key = f"spec.properties[{index}].name"
            raise ManifestError(
                where,
                f"{key}: {prop.name!r} is not a property of DeviceModel {model.metadata.name!r} "
                f"(it has: {', '.join(p.name for p in model.spec.properties) or 'none'})",
                path=key,
            )
        if prop.desired is not None:
            if not model_prop.writable:
                key = f"spec.properties[{index}].desired"
                raise ManifestError(
                    where,
                    f"{key}: property {prop.name!r} is "
                    "ReadOnly in its model; only ReadWrite properties take a desired value",
                    path=key,
                )
            try:
                coerce_value(prop.desired.value, model_prop.type, model_prop.minimum, model_prop.maximum)
            except ValueRejected as exc:
                key = f"spec.properties[{index}].desired.value"
                raise ManifestError(where, f"{key}: {exc.reason}", path=key) from None
