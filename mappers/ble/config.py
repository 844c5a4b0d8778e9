"""BLE configuration: how to find and talk to a device (``spec.protocol.configData``) and
where each property lives (``spec.properties[].visitors.configData``), validated when the
manifest loads, with errors naming device, property and field.

Example (docs/mappers/ble.md has more)::

    protocol:
      protocolName: ble
      configData: {name: "env-sensor-1", serviceUuid: "181A", keepConnected: true}
    properties:
    - name: temperature
      visitors: {protocolName: ble, configData: {characteristic: "2A6E", notify: true}}
    - name: relay
      visitors:
        protocolName: ble
        configData: {characteristic: "e7c10002-5e4d-4b7f-9a3c-6d2f00000000", dataType: bool}
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgetwin.mappers.ble.codec import (
    DATA_TYPES,
    FLOAT_TYPES,
    INT_TYPES,
    MEDICAL_TYPES,
    CodecError,
    Layout,
    PresentationFormat,
    decode_layout,
    encode_layout,
    normalize_uuid,
)
from edgetwin.mappers.ble.sig import SIG_BY_UUID, SIG_FORMATS, decode_sig, encode_sig
from edgetwin.mappers.sdk import PropertyBinding, PropertyType, Value

ADDRESS_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


class BleConfigError(ValueError):
    """A device's BLE config is invalid; the message names device, property and field."""


def _duration_ms(v: Any) -> int:
    from edgetwin.deviceapi.types import parse_duration_ms

    return parse_duration_ms(v)


def _uuid(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a UUID string, got {v!r:.40}")
    try:
        return normalize_uuid(v)
    except CodecError as exc:
        raise ValueError(str(exc)) from None


class Connection(BaseModel):
    """How to find and reach one device (``spec.protocol.configData``)."""

    model_config = ConfigDict(extra="forbid")

    # Found by address, or by advertised name (and service UUID when given).
    address: str | None = None
    name: str | None = None
    serviceUuid: str | None = None
    # connection: read and subscribe over GATT; advertisement: decode what it broadcasts.
    source: Literal["connection", "advertisement"] = "connection"
    # true: stay connected (notifications need it); false: connect each collectCycle,
    # read, disconnect, so that more devices than connection slots are served in turn.
    keepConnected: bool = True
    collectCycle: int | None = None  # ms; default: the properties' collectCycle, else 1 s
    scanTimeout: int = 10_000  # ms to look for the device per attempt
    connectTimeout: int = 10_000  # ms
    requestTimeout: int = 5_000  # ms per read or write
    # With no value (read or notification; for advertisement devices: no advertisement)
    # for this long the link is taken as dead: reconnect / mark offline. 0 = off for
    # connections (reads still time out); advertisement devices default to 30 s.
    silenceTimeout: int | None = None

    @field_validator(
        "collectCycle", "scanTimeout", "connectTimeout", "requestTimeout", "silenceTimeout", mode="before"
    )
    @classmethod
    def _durations(cls, v: Any) -> int | None:
        return None if v is None else _duration_ms(v)

    @field_validator("serviceUuid", mode="before")
    @classmethod
    def _service(cls, v: Any) -> str | None:
        return None if v is None else _uuid(v)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not ADDRESS_RE.match(v):
            raise ValueError(f"{v!r} is not a Bluetooth address like AA:BB:CC:DD:EE:FF")
        return v.upper() if v else v

    @model_validator(mode="after")
    def _findable(self) -> Connection:
        if not self.address and not self.name:
            raise ValueError("address or name is required to find the device")
        for key in ("scanTimeout", "connectTimeout", "requestTimeout"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive")
        if self.source == "advertisement" and self.silenceTimeout is None:
            self.silenceTimeout = 30_000
        return self


class Visitor(BaseModel):
    """Where one property lives: a characteristic (or an advertisement field) and how its
    bytes decode."""

    model_config = ConfigDict(extra="forbid")

    # GATT source
    characteristic: str | None = None
    service: str | None = None
    notify: bool = False  # subscribe instead of reading each collectCycle
    writeWithResponse: bool = True
    # Advertisement source: manufacturer data of a company id, or service data of a UUID.
    manufacturerId: int | None = Field(None, ge=0, le=0xFFFF)
    serviceData: str | None = None
    # Decoding: a SIG format name, "presentation" (descriptor 0x2904), or a custom layout.
    format: str | None = None
    field: str | int | None = None  # heart_rate: which field; struct: which field index
    dataType: str | None = None
    byteOffset: int = Field(0, ge=0, le=511)
    byteOrder: Literal["little", "big"] = "little"
    length: int | None = Field(None, ge=1, le=512)
    bit: int | None = Field(None, ge=0, le=7)
    struct: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    report: Literal["cycle", "change"] = "cycle"
    deadband: float | None = Field(None, ge=0)

    @field_validator("characteristic", "service", "serviceData", mode="before")
    @classmethod
    def _uuids(cls, v: Any) -> str | None:
        return None if v is None else _uuid(v)

    @model_validator(mode="after")
    def _consistent(self) -> Visitor:
        gatt = self.characteristic is not None
        advert = self.manufacturerId is not None or self.serviceData is not None
        if gatt and advert:
            raise ValueError(
                "characteristic: a property comes from a characteristic or an advertisement, not both"
            )
        if self.manufacturerId is not None and self.serviceData is not None:
            raise ValueError("manufacturerId: give manufacturerId or serviceData, not both")
        custom = self.dataType is not None or self.struct is not None
        if self.format is None:
            if custom:
                self.format = "custom"
            elif self.characteristic in SIG_BY_UUID:
                self.format = SIG_BY_UUID[self.characteristic].name
            elif gatt:
                self.format = "presentation"
            else:
                raise ValueError("dataType: advertisement fields need a dataType (or struct) or a SIG format")
        known = (*SIG_FORMATS, "presentation", "custom")
        if self.format not in known:
            raise ValueError(f"format: {self.format!r} is not one of {', '.join(known)}")
        if self.format == "custom" and not custom:
            raise ValueError("dataType: format custom needs a dataType or a struct layout")
        if self.format != "custom" and custom:
            raise ValueError(f"dataType: not used with format {self.format}; drop one of them")
        if self.format == "presentation" and not gatt:
            raise ValueError("format: presentation reads a descriptor, so it needs a characteristic")
        if self.dataType is not None and self.dataType not in DATA_TYPES:
            raise ValueError(f"dataType: {self.dataType!r} is not one of {', '.join(DATA_TYPES)}")
        if self.struct is not None:
            import struct as _struct

            try:
                n = len(_struct.unpack(self.struct, bytes(_struct.calcsize(self.struct))))
            except _struct.error as exc:
                raise ValueError(f"struct: {self.struct!r} is not a struct layout: {exc}") from None
            if self.dataType is not None:
                raise ValueError("struct: give a struct layout or a dataType, not both")
            if not isinstance(self.field, int) or not 0 <= self.field < n:
                raise ValueError(f"field: the index of the struct field to take, 0..{n - 1}")
        fmt = SIG_FORMATS.get(self.format or "")
        if fmt is not None and fmt.fields:
            if self.field is None:
                self.field = fmt.fields[0]
            if self.field not in fmt.fields:
                raise ValueError(f"field: {self.field!r} is not one of {', '.join(fmt.fields)}")
        elif self.field is not None and self.struct is None:
            with_fields = ", ".join(f.name for f in SIG_FORMATS.values() if f.fields)
            raise ValueError(f"field: only for struct layouts and {with_fields}")
        if self.bit is not None and self.dataType != "bool":
            raise ValueError("bit: only for dataType bool")
        if self.length is not None and self.dataType not in ("string", "bytes"):
            raise ValueError("length: only for dataType string or bytes")
        numeric = self.dataType in INT_TYPES or self.dataType in FLOAT_TYPES or self.dataType in MEDICAL_TYPES
        if (self.scale != 1.0 or self.offset != 0.0) and not (numeric or self.struct):
            raise ValueError("scale/offset: only for numeric custom layouts")
        if self.scale == 0:
            raise ValueError("scale: must not be 0")
        if self.notify and not gatt:
            raise ValueError("notify: only for characteristics")
        return self

    @property
    def is_advertisement(self) -> bool:
        return self.characteristic is None

    @cached_property
    def layout(self) -> Layout:
        """The custom layout, built once (decode runs for every notification)."""
        return Layout(
            data_type=self.dataType or "uint8",
            byte_offset=self.byteOffset,
            byte_order=self.byteOrder,
            length=self.length,
            bit=self.bit,
            scale=self.scale,
            offset=self.offset,
            struct_format=self.struct,
            field=self.field if isinstance(self.field, int) else 0,
        )

    def decode(self, data: bytes, presentation: PresentationFormat | None = None) -> Value:
        """This property's value from the characteristic's (or advertisement field's) bytes."""
        if self.format == "custom":
            return decode_layout(self.layout, data)
        if self.format == "presentation":
            if presentation is None:
                raise CodecError("the characteristic has no presentation format descriptor (0x2904)")
            return presentation.decode(data)
        return decode_sig(self.format or "", data, self.field if isinstance(self.field, str) else None)

    def encode(
        self, value: Value, current: bytes = b"", presentation: PresentationFormat | None = None
    ) -> bytes:
        """The bytes to write for ``value``; ``current`` is the last value read."""
        if self.format == "custom":
            return encode_layout(self.layout, value, current)
        if self.format == "presentation":
            if presentation is None:
                raise CodecError("the characteristic has no presentation format descriptor (0x2904)")
            return presentation.encode(value)
        return encode_sig(self.format or "", value)


def _problem(exc: ValidationError) -> str:
    from edgetwin.deviceapi.types import first_problem

    key, msg = first_problem(exc)
    return f".{key}: {msg}" if key else f": {msg}"


def parse_connection(device_id: str, data: Any) -> Connection:
    try:
        return Connection.model_validate(data or {})
    except ValidationError as exc:
        raise BleConfigError(f"device {device_id}: spec.protocol.configData{_problem(exc)}") from None


_NUMBER = (PropertyType.INT, PropertyType.FLOAT, PropertyType.DOUBLE)
_FRACTIONAL = (PropertyType.FLOAT, PropertyType.DOUBLE)


def _allowed_types(v: Visitor) -> tuple[PropertyType, ...]:
    if v.format in SIG_FORMATS:
        if v.field == "sensorContact":
            return (PropertyType.BOOLEAN,)
        if v.format == "battery_level" or v.field in ("heartRate", "energyExpended"):
            return _NUMBER
        return _FRACTIONAL
    if v.format == "presentation":
        return (*_NUMBER, PropertyType.BOOLEAN, PropertyType.STRING)
    dt = v.dataType
    if dt == "bool":
        return (PropertyType.BOOLEAN,)
    if dt == "string":
        return (PropertyType.STRING,)
    if dt == "bytes":
        return (PropertyType.BYTES,)
    if v.struct is not None:
        return (*_NUMBER, PropertyType.BOOLEAN, PropertyType.STRING)
    if dt in INT_TYPES and float(v.scale).is_integer() and float(v.offset).is_integer():
        return _NUMBER
    return _FRACTIONAL


def parse_visitor(device_id: str, conn: Connection, prop: PropertyBinding) -> Visitor:
    """The property's visitor, checked against the device's source, the model type and
    the access mode."""
    where = f"device {device_id} property {prop.name}: visitors.configData"
    if not prop.visitor:
        raise BleConfigError(f"{where}: missing (needs a characteristic, or an advertisement field)")
    try:
        v = Visitor.model_validate(dict(prop.visitor))
    except ValidationError as exc:
        raise BleConfigError(f"{where}{_problem(exc)}") from None
    if conn.source == "connection" and v.is_advertisement:
        raise BleConfigError(
            f"{where}.characteristic: required (the device's source is connection; "
            "manufacturerId/serviceData need source: advertisement)"
        )
    if conn.source == "advertisement" and not v.is_advertisement:
        raise BleConfigError(
            f"{where}.characteristic: the device's source is advertisement; use manufacturerId or serviceData"
        )
    if v.notify and not conn.keepConnected:
        raise BleConfigError(f"{where}.notify: needs keepConnected: true on the device")
    allowed = _allowed_types(v)
    if prop.type not in allowed:
        want = " or ".join(t.value for t in allowed)
        what = v.format if v.format != "custom" else f"dataType {v.dataType or 'struct'}"
        raise BleConfigError(f"{where}: {what} needs a {want} model property, not {prop.type.value}")
    if prop.writable:
        if v.is_advertisement:
            raise BleConfigError(
                f"{where}: advertisements are read-only; a ReadWrite property needs a characteristic"
            )
        fmt = SIG_FORMATS.get(v.format or "")
        if fmt is not None and fmt.encode is None:
            raise BleConfigError(
                f"{where}.format: {v.format} is read-only; it cannot back a ReadWrite property"
            )
    return v
