"""Finding mapper plugins (entry point group ``edgetwin.mappers``) and running them.

The gateway never imports a mapper by name. A device whose ``spec.protocol`` names a
protocol no installed mapper serves is reported once and left to external mappers over
MQTT; a device with no protocol is served over MQTT by design.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any

from edgetwin.deviceapi import Device, DeviceModel
from edgetwin.mappers.sdk import DeviceBinding, Mapper, MapperHost, PropertyBinding

log = logging.getLogger(__name__)

GROUP = "edgetwin.mappers"


class MapperLoadError(RuntimeError):
    """A mapper plugin could not be loaded or rejected a device's config."""


class Plugins(Mapping[str, type[Mapper]]):
    """Installed mapper classes by protocol name, each loaded the first time it is asked
    for: a gateway serving only Modbus devices never imports the BLE stack (each costs
    megabytes of memory on a small host). A plugin that fails to load is logged once and
    counts as not installed."""

    def __init__(self) -> None:
        self._points = {ep.name: ep for ep in entry_points(group=GROUP)}
        self._loaded: dict[str, type[Mapper] | None] = {}

    def __getitem__(self, name: str) -> type[Mapper]:
        if name not in self._loaded:
            self._loaded[name] = self._load(name)
        cls = self._loaded[name]
        if cls is None:
            raise KeyError(name)
        return cls

    def _load(self, name: str) -> type[Mapper] | None:
        ep = self._points.get(name)
        if ep is None:
            return None
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party plugin must not stop the gateway
            log.error("cannot load mapper plugin", extra={"plugin": ep.name, "error": repr(exc)})
            return None
        if not (isinstance(cls, type) and issubclass(cls, Mapper)):
            log.error(
                "entry point is not a Mapper subclass",
                extra={"plugin": ep.name, "target": ep.value},
            )
            return None
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._points)

    def __len__(self) -> int:
        return len(self._points)


def discover() -> Mapping[str, type[Mapper]]:
    """Installed mapper classes by protocol name (loaded when first asked for)."""
    return Plugins()


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
    """The running mapper instances of one gateway, and which device each serves.
    Devices come and go while running (cluster-defined devices): :meth:`apply` starts,
    reconfigures or stops one device through the mapper's hooks, without disturbing the
    others; a mapper without the hooks is restarted with all its devices."""

    def __init__(self, host: MapperHost, options: Mapping[str, Mapping[str, Any]]) -> None:
        self.host = host
        self.options = options
        self.available = discover()
        self.mappers: dict[str, Mapper] = {}
        self.bindings: dict[str, DeviceBinding] = {}
        self.by_device: dict[str, Mapper] = {}

    def serves(self, protocol: str) -> bool:
        return protocol in self.available

    async def start(self, devices: list[tuple[Device, DeviceModel]]) -> None:
        """Start the mappers for the devices served at start. A device whose config its
        mapper refuses raises :class:`MapperLoadError` (local manifests: fix the file)."""
        per_protocol: dict[str, list[DeviceBinding]] = {}
        for device, model in devices:
            b = self._binding(device, model)
            if b is None:
                continue
            try:
                self.available[b.protocol].validate(b)
            except ValueError as exc:
                raise MapperLoadError(str(exc)) from None
            per_protocol.setdefault(b.protocol, []).append(b)
        for name, bindings in per_protocol.items():
            mapper = self.available[name](self.host, self.options.get(name, {}))
            await mapper.start(bindings)
            self.mappers[name] = mapper
            for b in bindings:
                self.bindings[b.id] = b
                self.by_device[b.id] = mapper
            log.info("mapper started", extra={"protocol": name, "devices": len(bindings)})

    def _binding(self, device: Device, model: DeviceModel) -> DeviceBinding | None:
        if device.spec.protocol is None:
            return None
        name = device.spec.protocol.protocolName
        if name not in self.available:
            log.warning(
                "no mapper installed for protocol; device left to external mappers",
                extra={"device": device.id, "protocol": name, "installed": ", ".join(sorted(self.available))},
            )
            return None
        return binding(device, model)

    async def apply(self, serve: list[tuple[Device, DeviceModel]], remove: list[str]) -> None:
        """Start or reconfigure the devices of ``serve``, stop those of ``remove``."""
        for dev_id in remove:
            await self._drop(dev_id)
        for device, model in serve:
            b = self._binding(device, model)
            current = self.by_device.get(device.id)
            if b is None:
                await self._drop(device.id)
                continue
            mapper = self.mappers.get(b.protocol)
            if current is not None and current is not mapper:
                await self._drop(device.id)  # another protocol now
                current = None
            if mapper is None:
                mapper = self.available[b.protocol](self.host, self.options.get(b.protocol, {}))
                await mapper.start([b])
                self.mappers[b.protocol] = mapper
            elif current is None:
                await self._hook(mapper, b.protocol, mapper.add_device(b), extra=b)
            else:
                await self._hook(mapper, b.protocol, mapper.update_device(b), extra=b)
            self.bindings[b.id] = b
            self.by_device[b.id] = mapper

    async def _drop(self, dev_id: str) -> None:
        mapper = self.by_device.pop(dev_id, None)
        binding_ = self.bindings.pop(dev_id, None)
        if mapper is not None and binding_ is not None:
            await self._hook(mapper, binding_.protocol, mapper.remove_device(dev_id))

    async def _hook(
        self, mapper: Mapper, protocol: str, call: Any, extra: DeviceBinding | None = None
    ) -> None:
        """Run a device hook; a mapper without it is restarted with all its devices."""
        try:
            await call
        except NotImplementedError:
            bindings = [b for d, b in self.bindings.items() if self.by_device.get(d) is mapper]
            if extra is not None:
                bindings = [b for b in bindings if b.id != extra.id] + [extra]
            log.info(
                "mapper has no per-device hooks; restarting it with its devices",
                extra={"protocol": protocol, "devices": len(bindings)},
            )
            await mapper.stop()
            fresh = self.available[protocol](self.host, self.options.get(protocol, {}))
            await fresh.start(bindings)
            self.mappers[protocol] = fresh
            for b in bindings:
                self.by_device[b.id] = fresh
        except Exception as exc:  # a bug in a plugin must not stop the gateway
            log.error("mapper hook failed", extra={"protocol": protocol}, exc_info=exc)

    async def stop(self) -> None:
        for name, mapper in self.mappers.items():
            try:
                await mapper.stop()
            except Exception as exc:
                log.error("mapper failed to stop cleanly", extra={"protocol": name, "error": repr(exc)})
        self.mappers.clear()
