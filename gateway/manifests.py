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
from edgetwin.deviceapi.problems import Problem, compose_all, locate_errors, parse_path
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
                path="spec.deviceModelRef.name",
            ) from None


def _files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES))
        else:
            found.append(path)
    return found


def _subject(doc: Any) -> str:
    raw_meta = doc.get("metadata") if isinstance(doc, dict) else None
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    return f"{doc.get('kind')} {meta.get('namespace', 'default')}/{meta.get('name', '?')}"


def parse_object(doc: Any, where: str, node: yaml.Node | None = None) -> Device | DeviceModel | None:
    """Validate one YAML document; documents of other kinds are ignored (None). With the
    document's composed YAML ``node``, the error lists every problem with its line."""
    if not isinstance(doc, dict):
        raise ManifestError(where, "expected a mapping with apiVersion, kind, metadata, spec")
    kind = doc.get("kind")
    if kind not in ("Device", "DeviceModel"):
        return None
    subject = _subject(doc)
    cls: type[Device] | type[DeviceModel] = Device if kind == "Device" else DeviceModel
    try:
        return cls.model_validate(doc)
    except ValidationError as exc:
        key, msg = first_problem(exc)
        located = [
            (where, Problem(p.path, p.message, p.line, p.column, subject))
            for p in locate_errors(exc, cls, node)
        ]
        raise ManifestError(f"{where}: {subject}", f"{key}: {msg}", located) from None


def _placed(
    exc: ManifestError, file: Path, node: yaml.Node | None, subject: str = ""
) -> list[tuple[str, Any]]:
    """A one-problem ManifestError as a located problem in ``file`` (at its key path,
    if it names one, in ``node``)."""
    if exc.located:
        return exc.located
    message = exc.problem.removeprefix(f"{exc.path}: ") if exc.path else exc.problem
    return [(str(file), Problem(exc.path, message, subject=subject).at(node, parse_path(exc.path)))]


def load_manifests(paths: list[Path], node: str) -> ManifestSet:
    """Read every manifest under ``paths`` and keep the objects for ``node``.

    Raises :class:`ManifestError` listing every problem found (invalid objects,
    duplicates, devices whose model is missing or does not fit it), each with its file,
    line and column.
    """
    result = ManifestSet()
    problems: list[tuple[str, Any]] = []
    where: dict[tuple[str, str], tuple[Path, yaml.Node | None]] = {}  # device -> its file and node
    for file in _files(paths):
        try:
            text = file.read_text()
            docs = list(yaml_strict.safe_load_all(text))
        except UnicodeDecodeError as exc:
            problems.append(
                (str(file), Problem("", f"cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"))
            )
            continue
        except OSError as exc:
            problems.append((str(file), Problem("", f"cannot read: {exc.strerror or exc}")))
            continue
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
            problems.append((str(file), Problem("", f"not valid YAML: {exc}", line, column)))
            continue
        nodes = compose_all(text)
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            doc_node = nodes[index] if index < len(nodes) else None
            try:
                obj = parse_object(doc, str(file), doc_node)
            except ManifestError as exc:
                problems.extend(_placed(exc, file, doc_node))
                continue
            if obj is None:
                continue
            key = (obj.metadata.namespace, obj.metadata.name)
            if isinstance(obj, DeviceModel):
                if key in result.models:
                    problems.append(
                        (str(file), Problem("", "is defined twice", subject=_subject(doc)).at(doc_node, []))
                    )
                    continue
                result.models[key] = obj
            else:
                if key in result.devices:
                    problems.append(
                        (str(file), Problem("", "is defined twice", subject=_subject(doc)).at(doc_node, []))
                    )
                    continue
                if obj.spec.nodeName != node:
                    result.foreign.append(f"{key[0]}/{key[1]} (node {obj.spec.nodeName})")
                    continue
                result.devices[key] = obj
                where[key] = (file, doc_node)
    for key, device in result.devices.items():
        try:
            check_device_against_model(device, result.model_for(device))
        except ManifestError as exc:
            file, doc_node = where[key]
            problems.extend(_placed(exc, file, doc_node, f"Device {key[0]}/{key[1]}"))
    if problems:
        first = problems[0][1]
        raise ManifestError(problems[0][0], first.text(), problems)
    if result.foreign:
        log.info(
            "skipped devices of other nodes",
            extra={"node": node, "devices": ", ".join(result.foreign)},
        )
    return result
