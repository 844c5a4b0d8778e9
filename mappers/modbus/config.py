"""Modbus configuration: the device's connection (``spec.protocol.configData``) and each
property's visitor (``spec.properties[].visitors.configData``), validated when the
manifest loads, with errors naming device, property and field.

Example (docs/mappers/modbus.md has more)::

    protocol: {protocolName: modbus, configData: {transport: tcp, host: 10.0.0.7, unitId: 3}}
    properties:
    - name: flow
      visitors:
        protocolName: modbus
        configData: {table: holding_register, address: 100, dataType: float32,
                     byteOrder: big, wordOrder: little, scale: 0.1}
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgetwin.mappers.sdk import PropertyBinding, PropertyType

Table = Literal["coil", "discrete_input", "input_register", "holding_register"]
DataType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string", "bit"
]
Order = Literal["big", "little"]

BIT_TABLES = ("coil", "discrete_input")
WRITABLE_TABLES = ("coil", "holding_register")
INTEGER_TYPES = ("int16", "uint16", "int32", "uint32", "int64", "uint64")
NUMERIC_TYPES = (*INTEGER_TYPES, "float32", "float64")
# Protocol limits per read request (Modbus application protocol spec, 6.1-6.4).
MAX_READ_REGISTERS = 125
MAX_READ_BITS = 2000


class ModbusConfigError(ValueError):
    """A device's Modbus config is invalid; the message names device, property, field."""


def _duration_ms(v: Any) -> int:
    from edgetwin.deviceapi.types import parse_duration_ms

    return parse_duration_ms(v)


class Connection(BaseModel):
    """How to reach one device (``spec.protocol.configData``)."""

    model_config = ConfigDict(extra="forbid")

    transport: Literal["tcp", "rtu", "rtu-over-tcp"] = "tcp"
    host: str | None = None
    port: int = Field(502, ge=1, le=65535)
    serialPort: str | None = None
    baudrate: int = Field(9600, ge=300, le=4_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unitId: int = Field(1, ge=0, le=247)
    timeout: int = 1000  # ms per request
    retries: int = Field(1, ge=0, le=10)
    # RTU: silence between frames beyond the protocol's 3.5 characters, for slow devices.
    interFrameDelay: int = Field(0, ge=0, le=10_000)  # ms
    # Read planning: merge ranges separated by at most this many unused addresses, and
    # never ask for more than the limits (lower them for devices that need it).
    maxGap: int = Field(10, ge=0, le=MAX_READ_REGISTERS)
    maxRegisters: int = Field(MAX_READ_REGISTERS, ge=1, le=MAX_READ_REGISTERS)
    maxBits: int = Field(MAX_READ_BITS, ge=1, le=MAX_READ_BITS)

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> int:
        return _duration_ms(v)

    @model_validator(mode="after")
    def _endpoint(self) -> Connection:
        if self.transport in ("tcp", "rtu-over-tcp") and not self.host:
            raise ValueError(f"host is required for transport {self.transport}")
        if self.transport == "rtu" and not self.serialPort:
            raise ValueError("serialPort is required for transport rtu")
        return self


class Visitor(BaseModel):
    """Where and how one property lives on the device."""

    model_config = ConfigDict(extra="forbid")

    table: Table
    address: int = Field(ge=0, le=65535)
    dataType: DataType | None = None  # default: bool on coils/inputs, uint16 on registers
    byteOrder: Order = "big"  # order of the two bytes inside each register
    wordOrder: Order = "big"  # order of the registers of a multi-register value
    length: int | None = Field(None, ge=1, le=MAX_READ_REGISTERS)  # registers, for string
    bit: int | None = Field(None, ge=0, le=15)  # for dataType bit
    scale: float = 1.0
    offset: float = 0.0
    mask: int | None = Field(None, ge=1, le=2**64 - 1)
    shift: int = Field(0, ge=0, le=63)
    # Reporting: every cycle, or only on change (beyond deadband for numbers); the
    # property's reportCycle is the longest silence allowed either way.
    report: Literal["cycle", "change"] = "cycle"
    deadband: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Visitor:
        bit_table = self.table in BIT_TABLES
        if self.dataType is None:
            self.dataType = "bool" if bit_table else "uint16"
        dt = self.dataType
        if bit_table and dt != "bool":
            raise ValueError(f"dataType: {self.table} holds single bits; use bool, not {dt}")
        if not bit_table and dt == "bool":
            raise ValueError(
                "dataType: bool is for coils and discrete inputs; use bit (with bit: N) on registers"
            )
        if dt == "bit" and self.bit is None:
            raise ValueError("bit: required for dataType bit (0 = least significant)")
        if dt != "bit" and self.bit is not None:
            raise ValueError("bit: only for dataType bit")
        if dt == "string" and self.length is None:
            raise ValueError("length: required for dataType string (number of registers)")
        if dt != "string" and self.length is not None:
            raise ValueError("length: only for dataType string")
        if (self.mask is not None or self.shift) and dt not in INTEGER_TYPES:
            raise ValueError(f"mask/shift: only for integer types, not {dt}")
        if (self.scale != 1.0 or self.offset != 0.0) and dt not in NUMERIC_TYPES:
            raise ValueError(f"scale/offset: only for numeric types, not {dt}")
        if self.scale == 0:
            raise ValueError("scale: must not be 0")
        if self.deadband is not None and dt not in NUMERIC_TYPES:
            raise ValueError(f"deadband: only for numeric types, not {dt}")
        if self.address + self.count > 65536:
            raise ValueError(f"address: {self.address} + {self.count} registers runs past 65535")
        return self

    @cached_property
    def plain(self) -> bool:
        """True when the value is one register as it is (uint16, big-endian bytes, no
        mask/shift/scale/offset): the codec's fast path. Cached: a plain attribute
        after the first read, where a pydantic private attribute costs microseconds."""
        return (
            self.dataType == "uint16"
            and self.byteOrder == "big"
            and self.mask is None
            and self.shift == 0
            and self.scale == 1.0
            and self.offset == 0.0
        )

    @property
    def count(self) -> int:
        """Registers (or bits) the value occupies."""
        return register_count(self)

    @property
    def writable(self) -> bool:
        return self.table in WRITABLE_TABLES


_WIDTH = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
    "bit": 1,
    "bool": 1,
}


def register_count(v: Visitor) -> int:
    """How many registers (or bits, on bit tables) the value takes."""
    if v.dataType == "string":
        assert v.length is not None
        return v.length
    return _WIDTH[v.dataType or "uint16"]


_MODEL_TYPES: dict[str, tuple[PropertyType, ...]] = {
    "bool": (PropertyType.BOOLEAN,),
    "bit": (PropertyType.BOOLEAN,),
    "string": (PropertyType.STRING,),
}


def _problem(exc: ValidationError) -> str:
    from edgetwin.deviceapi.types import first_problem

    key, msg = first_problem(exc)
    return f"{key}: {msg}" if key else msg


def parse_connection(device_id: str, data: Any) -> Connection:
    try:
        return Connection.model_validate(data or {})
    except ValidationError as exc:
        raise ModbusConfigError(f"device {device_id}: spec.protocol.configData.{_problem(exc)}") from None


def parse_visitor(device_id: str, prop: PropertyBinding) -> Visitor:
    """The property's visitor, checked against its model type and access mode."""
    where = f"device {device_id} property {prop.name}: visitors.configData"
    if not prop.visitor:
        raise ModbusConfigError(f"{where}: missing (needs at least table and address)")
    try:
        v = Visitor.model_validate(dict(prop.visitor))
    except ValidationError as exc:
        raise ModbusConfigError(f"{where}.{_problem(exc)}") from None
    dt = v.dataType
    assert dt is not None
    allowed = _MODEL_TYPES.get(dt, (PropertyType.INT, PropertyType.FLOAT, PropertyType.DOUBLE))
    if prop.type not in allowed:
        want = " or ".join(t.value for t in allowed)
        raise ModbusConfigError(
            f"{where}.dataType: {dt} needs a {want} model property, not {prop.type.value}"
        )
    if prop.type is PropertyType.INT and (
        not float(v.scale).is_integer() or not float(v.offset).is_integer()
    ):
        raise ModbusConfigError(f"{where}.scale: {v.scale:g} makes fractions; use a FLOAT model property")
    if prop.type is PropertyType.INT and dt in ("float32", "float64"):
        raise ModbusConfigError(f"{where}.dataType: {dt} needs a FLOAT or DOUBLE model property")
    if prop.writable and not v.writable:
        raise ModbusConfigError(
            f"{where}.table: {v.table} is read-only in Modbus; a ReadWrite property needs a coil "
            "or holding_register"
        )
    return v
