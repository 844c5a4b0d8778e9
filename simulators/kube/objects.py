"""The Kubernetes API emulator's objects and their rules: resources read from CRDs,
errors as ``Status`` documents, merge and JSON patches, label and field selectors,
managedFields and Table cells."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from edgetwin.simulators.kube import jsonpath
from edgetwin.simulators.kube.schema import FieldError, Schema, error_message

BANNER = "edgetwin Kubernetes API emulator: a development stand-in, not for production"
DEFAULT_HISTORY = 10_000
DEFAULT_COMPACT_S = 300.0  # kube-apiserver's --etcd-compaction-interval
DEFAULT_BOOKMARK_S = 60.0  # about how often kube-apiserver sends a watch bookmark

# A watch event: (resourceVersion, plural, type, object, the object before the change).
Event = tuple[int, str, str, dict[str, Any], "dict[str, Any] | None"]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Resource:
    """One served custom resource (from a CRD)."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    list_kind: str
    short_names: list[str]
    namespaced: bool
    status_subresource: bool
    columns: list[dict[str, Any]]
    selectable: list[str]  # field paths without the leading dot, e.g. spec.nodeName
    categories: list[str] = field(default_factory=list)
    schema: dict[str, Any] = field(default_factory=dict)
    checker: Schema = field(default_factory=lambda: Schema({"type": "object"}))

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @classmethod
    def from_crd(cls, crd: dict[str, Any]) -> list[Resource]:
        spec = crd["spec"]
        names = spec["names"]
        out = []
        for v in spec["versions"]:
            if not v.get("served", True):
                continue
            out.append(
                cls(
                    group=spec["group"],
                    version=v["name"],
                    plural=names["plural"],
                    singular=names.get("singular", names["kind"].lower()),
                    kind=names["kind"],
                    list_kind=names.get("listKind", names["kind"] + "List"),
                    short_names=list(names.get("shortNames", [])),
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    status_subresource="status" in (v.get("subresources") or {}),
                    columns=list(v.get("additionalPrinterColumns", [])),
                    selectable=[f["jsonPath"].lstrip(".") for f in v.get("selectableFields", [])],
                    categories=list(names.get("categories", [])),
                    schema=(v.get("schema") or {}).get("openAPIV3Schema", {"type": "object"}),
                )
            )
            out[-1].checker = Schema(out[-1].schema)
            for column in out[-1].columns:
                jsonpath.compile_path(column["jsonPath"])  # the API server refuses a bad one
        return out


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status


def _invalid(res: Resource, name: str, errors: list[FieldError]) -> ApiError:
    """422 Invalid with one cause per field, as kube-apiserver answers a bad body
    (kubectl prints: The Device "x" is invalid: spec.nodeName: Required value)."""
    return ApiError(
        422,
        "Invalid",
        error_message(res.kind, res.group, name, errors),
        {
            "name": name,
            "group": res.group,
            "kind": res.kind,
            "causes": [{"reason": e.reason, "message": e.detail, "field": e.field} for e in errors],
        },
    )


def human_age(timestamp: str, now: datetime | None = None) -> str:
    """A creationTimestamp as kubectl shows ages (apimachinery's HumanDuration)."""
    try:
        then = datetime.fromisoformat(timestamp.replace("z", "Z").replace("Z", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        return "<unknown>"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    s = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    m, h, d = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if h < 192:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 365 * 2:
        return f"{d}d"
    return f"{d // 365}y"


def _record_manager(obj: dict[str, Any], manager: str, subresource: str | None) -> None:
    """Note who wrote and when in ``metadata.managedFields`` (one entry per manager and
    subresource, as kube-apiserver keeps them; field sets are not tracked). The relay's
    gateways use the newest spec write's time as the cloud's desired-value stamp."""
    entries = [
        e
        for e in obj["metadata"].get("managedFields", [])
        if not (e.get("manager") == manager and e.get("subresource") == subresource)
    ]
    entry: dict[str, Any] = {
        "manager": manager,
        "operation": "Update",
        "apiVersion": obj.get("apiVersion", ""),
        "time": _now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": {},
    }
    if subresource:
        entry["subresource"] = subresource
    obj["metadata"]["managedFields"] = [*entries, entry]


def _path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _cell(obj: dict[str, Any], path: str, kind: str) -> Any:
    """A printer column's cell as kube-apiserver's table converter makes it: the first
    JSONPath result; strings as the JSONPath printer writes them; dates as ages."""
    found = jsonpath.find(obj, path)
    if not found or found[0] is None:
        return None
    value = found[0]
    if kind == "date":
        return human_age(value) if isinstance(value, str) else None
    if kind == "string":
        return jsonpath.render(value)
    if kind == "integer":
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "number":
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, test (what clients send)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1] if parts else ""
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                if kind == "replace" and last not in parent:
                    raise ApiError(422, "Invalid", f"replace: no value at {op['path']}")
                parent[last] = op["value"]
        else:
            raise ApiError(422, "Invalid", f"unsupported JSON patch op {kind!r}")
    return doc


@dataclass
class Selector:
    """Label and field selector terms: (key, op, value) with op =, != or exists."""

    labels: list[tuple[str, str, str]]
    fields: list[tuple[str, str, str]]

    @staticmethod
    def _terms(text: str) -> list[tuple[str, str, str]]:
        terms = []
        for raw in filter(None, (t.strip() for t in text.split(","))):
            m = re.match(r"^([^!=]+?)\s*(==|!=|=)\s*(.*)$", raw)
            if m:
                terms.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
            elif raw.startswith("!"):
                terms.append((raw[1:], "!exists", ""))
            else:
                terms.append((raw, "exists", ""))
        return terms

    @classmethod
    def parse(cls, res: Resource, labels: str, fields: str) -> Selector:
        field_terms = cls._terms(fields)
        allowed = {"metadata.name", "metadata.namespace", *res.selectable}
        for key, op, _ in field_terms:
            if key not in allowed or op not in ("=", "!="):
                raise ApiError(400, "BadRequest", f"field label not supported: {key}")
        return cls(cls._terms(labels), field_terms)

    def matches(self, obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        for key, op, value in self.labels:
            if op == "exists" and key not in labels:
                return False
            if op == "!exists" and key in labels:
                return False
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
        for key, op, value in self.fields:
            actual = _path(obj, key)
            actual = "" if actual is None else str(actual)
            if (op == "=") != (actual == value):
                return False
        return True
