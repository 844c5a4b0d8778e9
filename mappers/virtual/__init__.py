"""The ``virtual`` mapper: simulated devices whose values move, for the demo and tests.

Each property's visitor config picks a signal::

    visitors: {protocolName: virtual, configData: {signal: sine, amplitude: 5, offset: 60, period: 30}}

Signals: ``sine`` (amplitude, offset, period s), ``walk`` (start, step, min, max),
``counter`` (start, step), ``constant`` (value), ``toggle`` (period s). A writable
property holds what was last written (as a real actuator would) and reports it back.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, ClassVar

from edgetwin.mappers.sdk import (
    DeviceBinding,
    MapperError,
    PollingMapper,
    PropertyBinding,
    PropertyType,
    Value,
)

SIGNALS = ("sine", "walk", "counter", "constant", "toggle")


class VirtualMapper(PollingMapper):
    protocol: ClassVar[str] = "virtual"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._state: dict[tuple[str, str], Any] = {}
        self._t0 = time.monotonic()
        self._rng = random.Random(self.options.get("seed"))

    @classmethod
    def validate(cls, device: DeviceBinding) -> None:
        for prop in device.properties:
            signal = prop.visitor.get("signal", "constant" if prop.writable else "walk")
            if signal not in SIGNALS:
                raise ValueError(
                    f"device {device.id} property {prop.name}: visitors.configData.signal "
                    f"{signal!r} is not one of {', '.join(SIGNALS)}"
                )

    def _value(self, device: DeviceBinding, prop: PropertyBinding) -> Any:
        key = (device.id, prop.name)
        cfg = prop.visitor
        signal = cfg.get("signal", "constant" if prop.writable else "walk")
        t = time.monotonic() - self._t0
        if signal == "sine":
            value: Any = float(cfg.get("offset", 0)) + float(cfg.get("amplitude", 1)) * math.sin(
                2 * math.pi * t / float(cfg.get("period", 60))
            )
            value = round(value, 2)
        elif signal == "walk":
            prev = self._state.get(key, float(cfg.get("start", 0)))
            value = prev + self._rng.uniform(-1, 1) * float(cfg.get("step", 1))
            value = round(
                min(float(cfg.get("max", math.inf)), max(float(cfg.get("min", -math.inf)), value)),
                2,
            )
            self._state[key] = value
        elif signal == "counter":
            value = self._state.get(key, int(cfg.get("start", 0)) - int(cfg.get("step", 1))) + int(
                cfg.get("step", 1)
            )
            self._state[key] = value
        elif signal == "toggle":
            value = int(t / float(cfg.get("period", 10))) % 2 == 1
        else:
            value = self._state.get(key, cfg.get("value", _zero(prop.type)))
        if prop.type is PropertyType.INT and isinstance(value, float):
            value = round(value)
        return value

    async def read(self, device: DeviceBinding) -> dict[str, Any]:
        if self.options.get("offline", {}).get(device.id):
            raise MapperError("simulated device is switched off")
        return {p.name: self._value(device, p) for p in device.properties}

    async def write(self, device: DeviceBinding, prop: str, value: Value) -> None:
        binding = device.get_property(prop)
        if not binding.writable:
            raise MapperError(f"{prop} is read-only")
        self._state[(device.id, prop)] = value
        await self.host.report(device.id, {prop: value}, int(time.time() * 1000))


def _zero(kind: PropertyType) -> Any:
    return {PropertyType.BOOLEAN: False, PropertyType.STRING: "", PropertyType.BYTES: ""}.get(kind, 0)
