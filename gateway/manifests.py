"""Loading Device and DeviceModel manifests from local YAML files and folders.

The gateway runs with no cluster at all on these; the same objects come from the cloud
once it is connected. Errors name the file, the object and the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgetwin.deviceapi import Device, DeviceModel, ManifestError, yaml_strict
from edgetwin.deviceapi.types import check_device_against_model, first_problem

log = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class ManifestSet:
    """The objects for one node, keyed by (namespace, name)."""

    models: dict[tuple[str, str], DeviceModel] = field(default_factory=dict)
    devices: dict[tuple[str, str], Device] = field(default_factory=dict)
    # Devices found that belong to other nodes: skipped, named in the log.
    foreign: list[str] = field(default_factory=list)

    def model_for(self, device: Device) -> DeviceModel:
        key = (device.metadata.namespace, device.spec.deviceModelRef.name)
        try:
            return self.models[key]
        except KeyError:
            raise ManifestError(
                f"Device {device.metadata.namespace}/{device.metadata.name}",
                f"spec.deviceModelRef.name: DeviceModel {key[0]}/{key[1]} is not defined "
                "(a model must be in the device's namespace)",
            ) from None


def _files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES))
        else:
            found.append(path)
    return found


def parse_object(doc: Any, where: str) -> Device | DeviceModel | None:
    """Validate one YAML document; documents of other kinds are ignored (None)."""
    if not isinstance(doc, dict):
        raise ManifestError(where, "expected a mapping with apiVersion, kind, metadata, spec")
    kind = doc.get("kind")
    if kind not in ("Device", "DeviceModel"):
        return None
    raw_meta = doc.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    where = f"{where}: {kind} {meta.get('namespace', 'default')}/{meta.get('name', '?')}"
    cls: type[Device] | type[DeviceModel] = Device if kind == "Device" else DeviceModel
    try:
        return cls.model_validate(doc)
    except ValidationError as exc:
        key, msg = first_problem(exc)
        raise ManifestError(where, f"{key}: {msg}") from None


def load_manifests(paths: list[Path], node: str) -> ManifestSet:
    """Read every manifest under ``paths`` and keep the objects for ``node``.

    Raises :class:`ManifestError` on the first invalid object, duplicate, or device whose
    model is missing or does not fit it.
    """
    result = ManifestSet()
    for file in _files(paths):
        try:
            docs = list(yaml_strict.safe_load_all(file.read_text()))
        except UnicodeDecodeError as exc:
            raise ManifestError(
                str(file), f"cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        except (OSError, yaml.YAMLError) as exc:
            raise ManifestError(str(file), f"cannot read: {exc}") from None
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            obj = parse_object(doc, f"{file}[{index}]")
            if obj is None:
                continue
            key = (obj.metadata.namespace, obj.metadata.name)
            if isinstance(obj, DeviceModel):
                if key in result.models:
                    raise ManifestError(str(file), f"DeviceModel {key[0]}/{key[1]} is defined twice")
                result.models[key] = obj
            else:
                if key in result.devices:
                    raise ManifestError(str(file), f"Device {key[0]}/{key[1]} is defined twice")
                if obj.spec.nodeName != node:
                    result.foreign.append(f"{key[0]}/{key[1]} (node {obj.spec.nodeName})")
                    continue
                result.devices[key] = obj
    for device in result.devices.values():
        check_device_against_model(device, result.model_for(device))
    if result.foreign:
        log.info(
            "skipped devices of other nodes",
            extra={"node": node, "devices": ", ".join(result.foreign)},
        )
    return result
