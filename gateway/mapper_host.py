"""Finding mapper plugins (entry point group ``edgetwin.mappers``) and running them.

The gateway never imports a mapper by name. A device whose ``spec.protocol`` names a
protocol no installed mapper serves is reported once and left to external mappers over
MQTT; a device with no protocol is served over MQTT by design.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from deviceapi import Device, DeviceModel
from mappers.sdk import DeviceBinding, Mapper, MapperHost, PropertyBinding

log = logging.getLogger(__name__)

GROUP = "edgetwin.mappers"


class MapperLoadError(RuntimeError):
    """A mapper plugin could not be loaded or rejected a device's config."""


def discover() -> dict[str, type[Mapper]]:
    """Installed mapper classes by protocol name."""
    found: dict[str, type[Mapper]] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party plugin must not stop the gateway
            log.error("cannot load mapper plugin", extra={"plugin": ep.name, "error": repr(exc)})
            continue
        if not (isinstance(cls, type) and issubclass(cls, Mapper)):
            log.error(
                "entry point is not a Mapper subclass",
                extra={"plugin": ep.name, "target": ep.value},
            )
            continue
        found[ep.name] = cls
    return found


def binding(device: Device, model: DeviceModel) -> DeviceBinding:
    """What a mapper sees of a device: protocol config and every model property with
    the device's visitor config and cycles."""
    specs = {p.name: p for p in device.spec.properties}
    props = []
    for mp in model.spec.properties:
        sp = specs.get(mp.name)
        props.append(
            PropertyBinding(
                name=mp.name,
                type=mp.type,
                writable=mp.writable,
                unit=mp.unit,
                minimum=mp.minimum,
                maximum=mp.maximum,
                visitor=dict(sp.visitors.configData) if sp and sp.visitors else {},
                collect_cycle_ms=sp.collectCycle if sp else None,
                report_cycle_ms=sp.reportCycle if sp else None,
            )
        )
    protocol = device.spec.protocol
    assert protocol is not None
    return DeviceBinding(
        id=device.id,
        namespace=device.metadata.namespace,
        name=device.metadata.name,
        protocol=protocol.protocolName,
        config=dict(protocol.configData),
        properties=tuple(props),
    )


def validate_devices(devices: list[tuple[Device, DeviceModel]]) -> list[str]:
    """Check every device against its installed mapper's ``validate``; returns the
    protocols no installed mapper serves. Raises :class:`MapperLoadError`."""
    available = discover()
    missing: list[str] = []
    for device, model in devices:
        if device.spec.protocol is None:
            continue
        name = device.spec.protocol.protocolName
        if name not in available:
            missing.append(name)
            continue
        try:
            available[name].validate(binding(device, model))
        except ValueError as exc:
            raise MapperLoadError(str(exc)) from None
    return sorted(set(missing))


class MapperSet:
    """The running mapper instances of one gateway, and which device each serves."""

    def __init__(self, host: MapperHost, options: Mapping[str, Mapping[str, Any]]) -> None:
        self.host = host
        self.options = options
        self.mappers: dict[str, Mapper] = {}
        self.bindings: dict[str, DeviceBinding] = {}
        self.by_device: dict[str, Mapper] = {}

    async def start(self, devices: list[tuple[Device, DeviceModel]]) -> None:
        available = discover()
        per_protocol: dict[str, list[DeviceBinding]] = {}
        for device, model in devices:
            if device.spec.protocol is None:
                continue
            name = device.spec.protocol.protocolName
            if name not in available:
                log.warning(
                    "no mapper installed for protocol; device left to external mappers",
                    extra={
                        "device": device.id,
                        "protocol": name,
                        "installed": ", ".join(sorted(available)),
                    },
                )
                continue
            b = binding(device, model)
            try:
                available[name].validate(b)
            except ValueError as exc:
                raise MapperLoadError(str(exc)) from None
            per_protocol.setdefault(name, []).append(b)
        for name, bindings in per_protocol.items():
            mapper = available[name](self.host, self.options.get(name, {}))
            await mapper.start(bindings)
            self.mappers[name] = mapper
            for b in bindings:
                self.bindings[b.id] = b
                self.by_device[b.id] = mapper
            log.info("mapper started", extra={"protocol": name, "devices": len(bindings)})

    async def stop(self) -> None:
        for name, mapper in self.mappers.items():
            try:
                await mapper.stop()
            except Exception as exc:
                log.error("mapper failed to stop cleanly", extra={"protocol": name, "error": repr(exc)})
        self.mappers.clear()
