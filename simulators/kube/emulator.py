"""An emulator of the Kubernetes API for custom resources: a development stand-in for
tests and the demo, NEVER for production (no auth, no etcd, memory only).

It serves the CRDs it is given (``deploy/crds/*.yaml``) with the semantics the relay and
``kubectl`` rely on:

* discovery (``/api``, ``/apis``, ``/apis/GROUP/VERSION``; legacy documents, which
  clients fall back to from aggregated discovery), ``/version``;
* ``resourceVersion`` from one counter; ``generation`` bumped on spec changes;
* create, get, list, update (409 Conflict on a stale ``resourceVersion``), delete;
* the ``status`` subresource: updates of the main resource ignore status, updates of
  ``/status`` touch only status;
* JSON merge patch (RFC 7386) and JSON patch (RFC 6902); strategic merge patch is
  refused with 415 as a real API server does for custom resources;
* list and watch with label selectors and field selectors limited, as in a real API
  server, to ``metadata.name``, ``metadata.namespace`` and the CRD's
  ``selectableFields`` (anything else is 400 BadRequest);
* watch from a ``resourceVersion`` replays what changed since; one older than the
  retained history (``history`` events, oldest dropped first) gets 410 Gone; streaming
  lists (``sendInitialEvents``, as ``kubectl wait`` asks) end their initial events with
  the ``k8s.io/initial-events-end`` bookmark;
* Table output (``Accept: ...;as=Table;...``) from the CRD's printer columns (JSONPath
  with filters, first result only, dates as ages: ``edgetwin.simulators.kube.jsonpath``);
* the CRD's structural schema (``edgetwin.simulators.kube.schema``): unknown fields pruned (refused
  with ``fieldValidation=Strict``, as kubectl asks; a ``Warning`` header otherwise),
  defaults applied, types, required fields, enums, patterns, bounds, list-map keys and
  ``x-kubernetes-validations`` CEL rules checked (422 Invalid, naming each field);
* namespaced and cluster-scoped resources;
* RBAC for chosen bearer tokens (``rbac={token: ClusterRole rules}``): a request with
  such a token gets 403 Forbidden unless a rule grants its verb on its resource (or
  subresource), as kube-apiserver answers a service account; other tokens may do all.

Counters (``stats``) let tests check how often status was written per object.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from edgetwin.runtime.aio import wait_within
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


class Emulator:
    """The API state and its aiohttp application."""

    def __init__(
        self,
        crds: Iterable[dict[str, Any]],
        history: int = DEFAULT_HISTORY,
        *,
        compact_s: float | None = DEFAULT_COMPACT_S,
        bookmark_s: float = DEFAULT_BOOKMARK_S,
        selectable_fields: bool = True,
        managed_fields: bool = True,
        rbac: dict[str, list[dict[str, Any]]] | None = None,
    ) -> None:
        self.rbac = rbac or {}
        self.resources: dict[tuple[str, str, str], Resource] = {}
        for crd in crds:
            for res in Resource.from_crd(crd):
                if not selectable_fields:
                    res.selectable = []  # as before Kubernetes 1.31 (or the gate off)
                self.resources[(res.group, res.version, res.plural)] = res
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name)
        self.rv = 0
        # Bound: the newest ``history`` events; a watch from before them gets 410 Gone.
        # Each event: (rv, plural, type, object, object before the change or None).
        self.events: deque[Event] = deque(maxlen=history)
        self.watchers: set[asyncio.Queue[Event | None]] = set()
        # The watchers by (plural, spec.nodeName they select, or None for any): an event
        # goes only to those that may want it, as kube-apiserver's watch cache indexes
        # pods by node (a thousand gateways' watches would otherwise each wake per event).
        self._watching: dict[tuple[str, str | None], set[asyncio.Queue[Event | None]]] = {}
        # Object keys by spec.nodeName (kept by _emit), so a node's list does not scan all.
        self._by_node: dict[str, set[tuple[str, str, str]]] = {}
        # ...and by resource, so a list of 10 DeviceModels does not scan 20,000 Devices.
        self._by_plural: dict[str, set[tuple[str, str, str]]] = {}
        # etcd compaction as kube-apiserver drives it: every compact_s, history up to
        # the resourceVersion of the previous round is forgotten (so 1-2 rounds are kept).
        self.compact_s, self.bookmark_s = compact_s, bookmark_s
        self.compacted = 0
        self._compact_mark = 0
        self.selectable_fields, self.managed_fields = selectable_fields, managed_fields
        self.stats: Counter[str] = Counter()
        # When each of the last requests arrived (time.monotonic()), for rate checks.
        self.request_times: deque[float] = deque(maxlen=200_000)
        self.status_writes: Counter[tuple[str, str]] = Counter()  # (namespace, name)
        self.watch_timeouts: deque[float | None] = deque(maxlen=10_000)  # each watch's timeoutSeconds
        # Fault injection for tests: the next N writes answer 409 Conflict, as when
        # someone else wrote the object between a client's read and its write; the next N
        # requests (watches aside) answer 500, or take slow_s longer.
        self.conflicts_to_inject = 0
        self.errors_to_inject = 0
        self.slow_to_inject = 0
        self.slow_s = 2.0

    @classmethod
    def from_files(cls, paths: Iterable[Path], history: int = DEFAULT_HISTORY, **options: Any) -> Emulator:
        crds = []
        for path in paths:
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    crds.append(doc)
        return cls(crds, history, **options)

    def compact(self) -> None:
        """One compaction round: forget history up to the previous round's mark."""
        self.compacted, self._compact_mark = self._compact_mark, self.rv
        while self.events and self.events[0][0] <= self.compacted:
            self.events.popleft()

    # --- state ------------------------------------------------------------------

    def _emit(self, res: Resource, kind: str, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        event = (self.rv, res.plural, kind, copy.deepcopy(obj), old)
        self.events.append(event)
        meta = obj["metadata"]
        key = (res.plural, meta.get("namespace") or "", meta["name"])
        of_plural = self._by_plural.setdefault(res.plural, set())
        if kind == "DELETED":
            of_plural.discard(key)
        else:
            of_plural.add(key)
        for o in (old,) if kind == "DELETED" else (old, obj):
            if o is None:
                continue
            by = self._by_node.setdefault(str((o.get("spec") or {}).get("nodeName")), set())
            if o is obj:
                by.add(key)
            else:
                by.discard(key)
        targets = set(self._watching.get((res.plural, None), ()))
        for o in (obj, old):
            if o is not None:
                node = (o.get("spec") or {}).get("nodeName")
                targets |= self._watching.get((res.plural, str(node)), set())
        for q in targets:
            q.put_nowait(event)

    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def create(
        self,
        res: Resource,
        ns: str,
        body: dict[str, Any],
        manager: str = "unknown",
        validation: str = "Warn",
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
        if not name:
            raise ApiError(
                422, "Invalid", f"{res.kind}.{res.group} is invalid: metadata.name: Required value"
            )
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise _invalid(
                res,
                name,
                [
                    FieldError(
                        "metadata.name",
                        "FieldValueInvalid",
                        f"Invalid value: {json.dumps(name)}: a lowercase RFC 1123 subdomain must consist of "
                        "lower case alphanumeric characters, '-' or '.', and must start and end with an "
                        "alphanumeric character",
                    )
                ],
            )
        key = (res.plural, ns, name)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{res.plural}.{res.group} "{name}" already exists')
        if body.get("kind") not in (None, res.kind):
            raise ApiError(400, "BadRequest", f"kind {body.get('kind')!r} does not match {res.kind}")
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        obj["metadata"].update(name=name, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        obj["metadata"].pop("generateName", None)
        if res.namespaced:
            obj["metadata"]["namespace"] = ns
        if res.status_subresource:
            obj.pop("status", None)
        obj = self._admit(res, name, obj, None, validation, warnings)
        obj["metadata"].pop("managedFields", None)
        if self.managed_fields:
            _record_manager(obj, manager, None)
        self._bump(obj)
        self.objects[key] = obj
        self._emit(res, "ADDED", obj)
        return obj

    def get(self, res: Resource, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((res.plural, ns, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{res.plural}.{res.group} "{name}" not found')
        return obj

    def _admit(
        self,
        res: Resource,
        name: str,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        validation: str,
        warnings: list[str] | None,
    ) -> dict[str, Any]:
        """Prune, default and validate a body against the CRD schema."""
        admission = res.checker.admit(obj, old)
        if admission.unknown:
            if validation == "Strict":
                unknown = ", ".join(f'unknown field "{f}"' for f in admission.unknown)
                raise ApiError(
                    400,
                    "BadRequest",
                    f'{res.kind} in version "{res.version}" cannot be handled as a {res.kind}: '
                    f"strict decoding error: {unknown}",
                )
            if validation != "Ignore" and warnings is not None:
                warnings.extend(f'unknown field "{f}"' for f in admission.unknown)
        if admission.errors:
            raise _invalid(res, name, admission.errors)
        return admission.obj

    def replace(
        self,
        res: Resource,
        ns: str,
        name: str,
        body: dict[str, Any],
        status: bool,
        manager: str = "unknown",
        validation: str = "Warn",
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        current = self.get(res, ns, name)
        want_rv = (body.get("metadata") or {}).get("resourceVersion")
        if self.conflicts_to_inject > 0:
            self.conflicts_to_inject -= 1
            want_rv = "stale"
        if want_rv and want_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.plural}.{res.group} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        new = copy.deepcopy(current)
        if status:
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
            self.status_writes[(ns, name)] += 1
        else:
            keep = {
                k: v
                for k, v in current["metadata"].items()
                if k in ("uid", "creationTimestamp", "generation", "name", "namespace", "managedFields")
            }
            new = {
                k: copy.deepcopy(v) for k, v in body.items() if k != "status" or not res.status_subresource
            }
            new.setdefault("metadata", {}).update(keep)
            new["apiVersion"], new["kind"] = res.api_version, res.kind
            if res.status_subresource and "status" in current:
                new["status"] = copy.deepcopy(current["status"])
        new = self._admit(res, name, new, current, validation, warnings)
        if not status and new.get("spec") != current.get("spec"):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if new == current:
            return current  # a no-op write does not bump resourceVersion, as in Kubernetes
        if self.managed_fields:
            _record_manager(new, manager, "status" if status else None)
        self._bump(new)
        self.objects[(res.plural, ns, name)] = new
        self._emit(res, "MODIFIED", new, current)
        return new

    def patch(
        self,
        res: Resource,
        ns: str,
        name: str,
        content_type: str,
        body: Any,
        status: bool,
        manager: str = "unknown",
        validation: str = "Warn",
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        current = self.get(res, ns, name)
        if content_type == "application/merge-patch+json":
            patched = merge_patch(copy.deepcopy(current), body)
        elif content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
            patched = json_patch(current, body)
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/json-patch+json, application/merge-patch+json (got {content_type})",
            )
        if not isinstance(patched, dict):
            raise ApiError(422, "Invalid", "the patch does not produce an object")
        patched.setdefault("metadata", {})
        want_rv = patched["metadata"].get("resourceVersion")
        if want_rv == current["metadata"]["resourceVersion"]:
            patched["metadata"].pop("resourceVersion")  # not in the patch: no precondition
        return self.replace(res, ns, name, patched, status, manager, validation, warnings)

    def delete(self, res: Resource, ns: str, name: str) -> dict[str, Any]:
        obj = self.get(res, ns, name)
        del self.objects[(res.plural, ns, name)]
        obj = copy.deepcopy(obj)
        self._bump(obj)
        self._emit(res, "DELETED", obj, obj)
        return obj

    def select(self, res: Resource, ns: str | None, sel: Selector) -> list[dict[str, Any]]:
        node = next((v for k, op, v in sel.fields if k == "spec.nodeName" and op == "="), None)
        keys = self._by_node.get(node, set()) if node is not None else self._by_plural.get(res.plural, set())
        return [
            self.objects[key]
            for key in sorted(keys)
            if key[0] == res.plural
            and (ns is None or key[1] == ns)
            and key in self.objects
            and sel.matches(self.objects[key])
        ]

    # --- HTTP ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        r = app.router
        r.add_get("/version", self._version)
        r.add_get("/api", self._api)
        r.add_get("/api/v1", self._api_v1)
        r.add_get("/apis", self._apis)
        r.add_get("/apis/{group}/{version}", self._group_version)
        r.add_get("/openapi/v3", self._openapi_root)
        r.add_get("/openapi/v3/apis/{group}/{version}", self._openapi_group)
        r.add_get("/api/v1/namespaces/{ns}/events", self._events)
        r.add_get("/api/v1/events", self._events)
        base = "/apis/{group}/{version}"
        r.add_get(base + "/{plural}", self._list)
        r.add_post(base + "/{plural}", self._create)  # cluster-scoped
        r.add_get(base + "/namespaces/{ns}/{plural}", self._list)
        r.add_post(base + "/namespaces/{ns}/{plural}", self._create)
        for scope in (base + "/namespaces/{ns}/{plural}/{name}", base + "/{plural}/{name}"):
            for suffix in ("", "/{sub:status}"):
                r.add_get(scope + suffix, self._get)
                r.add_put(scope + suffix, self._put)
                r.add_patch(scope + suffix, self._patch)
            r.add_delete(scope, self._delete)
        return app

    def _authorize(self, request: web.Request) -> None:
        """RBAC for the tokens given as ``rbac`` (discovery is open to all, as
        system:discovery makes it)."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        rules = self.rbac.get(token)
        info = request.match_info
        if rules is None or "plural" not in info:
            return
        resource = info["plural"] + ("/status" if info.get("sub") else "")
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(request.method)
        if verb is None:
            verb = "get" if "name" in info else "watch" if self._is_watch(request) else "list"
        for rule in rules:
            if (
                info["group"] in rule.get("apiGroups", ())
                and resource in rule.get("resources", ())
                and (verb in rule.get("verbs", ()) or "*" in rule.get("verbs", ()))
            ):
                return
        where = f' in the namespace "{info["ns"]}"' if "ns" in info else ""
        name = f' "{info["name"]}"' if "name" in info else ""
        raise ApiError(
            403,
            "Forbidden",
            f'{info["plural"]}.{info["group"]}{name} is forbidden: User "{token}" cannot {verb} resource '
            f'"{resource}" in API group "{info["group"]}"{where}',
        )

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        watch = self._is_watch(request)
        self.stats[f"{'WATCH' if watch else request.method} {request.path.split('/namespaces/')[0]}"] += 1
        self.request_times.append(time.monotonic())
        try:
            self._authorize(request)
        except ApiError as exc:
            self.stats["forbidden"] += 1
            return web.json_response(exc.status(), status=exc.code)
        if not watch:
            if self.errors_to_inject > 0:
                self.errors_to_inject -= 1
                error = ApiError(500, "InternalError", "an injected API server failure")
                return web.json_response(error.status(), status=500)
            if self.slow_to_inject > 0:
                self.slow_to_inject -= 1
                await asyncio.sleep(self.slow_s)
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except ApiError as exc:
            return web.json_response(exc.status(), status=exc.code)
        except json.JSONDecodeError as exc:
            return web.json_response(ApiError(400, "BadRequest", f"invalid JSON: {exc}").status(), status=400)
        except ConnectionResetError:  # the client went away mid-request (a killed relay)
            return web.Response(status=499)

    def _resource(self, request: web.Request) -> Resource:
        info = request.match_info
        res = self.resources.get((info["group"], info["version"], info["plural"]))
        scoped = "ns" in info
        # A collection of a namespaced resource may be listed across namespaces; an
        # object is addressed in its scope only.
        wrong_scope = (
            res is not None and res.namespaced != scoped and ("name" in info or request.method == "POST")
        )
        if res is None or wrong_scope:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        return res

    @staticmethod
    def _ns(request: web.Request) -> str:
        return request.match_info.get("ns", "")

    @staticmethod
    def _validation(request: web.Request) -> str:
        mode = request.query.get("fieldValidation", "Warn")
        if mode not in ("Strict", "Warn", "Ignore"):
            raise ApiError(
                400, "BadRequest", f'fieldValidation parameter unsupported: "{mode}" (Strict, Warn or Ignore)'
            )
        return mode

    @staticmethod
    def _respond(obj: dict[str, Any], warnings: list[str], status: int = 200) -> web.Response:
        response = web.json_response(obj, status=status)
        for text in warnings:
            response.headers.add("Warning", f"299 - {json.dumps(text)}")
        return response

    async def _events(self, _r: web.Request) -> web.Response:
        """No core Events are kept; an empty list lets ``kubectl describe`` finish."""
        return web.json_response(
            {
                "kind": "EventList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.rv)},
                "items": [],
            }
        )

    async def _version(self, _r: web.Request) -> web.Response:
        return web.json_response(
            {
                "major": "1",
                "minor": "31" if self.selectable_fields else "30",
                "gitVersion": f"v1.{31 if self.selectable_fields else 30}.0-edgetwin-emulator",
                "platform": "linux/amd64",
            }
        )

    async def _api(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}],
            }
        )

    async def _api_v1(self, _r: web.Request) -> web.Response:
        return web.json_response({"kind": "APIResourceList", "groupVersion": "v1", "resources": []})

    async def _apis(self, _r: web.Request) -> web.Response:
        groups: dict[str, list[str]] = {}
        for g, v, _ in self.resources:
            groups.setdefault(g, [])
            if v not in groups[g]:
                groups[g].append(v)
        return web.json_response(
            {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                        "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                    }
                    for g, vs in groups.items()
                ],
            }
        )

    async def _group_version(self, request: web.Request) -> web.Response:
        g, v = request.match_info["group"], request.match_info["version"]
        resources = []
        for (rg, rv, _), res in self.resources.items():
            if (rg, rv) != (g, v):
                continue
            resources.append(
                {
                    "name": res.plural,
                    "singularName": res.singular,
                    "namespaced": res.namespaced,
                    "kind": res.kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                    "shortNames": res.short_names,
                    "categories": res.categories,
                }
            )
            if res.status_subresource:
                resources.append(
                    {
                        "name": f"{res.plural}/status",
                        "singularName": "",
                        "namespaced": res.namespaced,
                        "kind": res.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
        if not resources:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        return web.json_response(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{g}/{v}",
                "resources": resources,
            }
        )

    async def _openapi_root(self, _r: web.Request) -> web.Response:
        paths = {
            f"apis/{g}/{v}": {"serverRelativeURL": f"/openapi/v3/apis/{g}/{v}?hash={self.rv}"}
            for g, v, _ in self.resources
        }
        return web.json_response({"paths": paths})

    async def _openapi_group(self, request: web.Request) -> web.Response:
        """An OpenAPI v3 document for one group version: the CRD schemas, and the write
        operations declaring ``fieldValidation`` (kubectl then validates server-side)."""
        g, v = request.match_info["group"], request.match_info["version"]
        schemas: dict[str, Any] = {}
        paths: dict[str, Any] = {}
        reversed_group = ".".join(reversed(g.split(".")))
        for (rg, rv, _), res in self.resources.items():
            if (rg, rv) != (g, v):
                continue
            gvk = [{"group": g, "version": v, "kind": res.kind}]
            schema = copy.deepcopy(res.schema)
            schema["x-kubernetes-group-version-kind"] = gvk
            schemas[f"{reversed_group}.{v}.{res.kind}"] = schema
            params = [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
                {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
            ]

            def op(
                verb: str, params: list[dict[str, Any]] = params, gvk: list[dict[str, str]] = gvk
            ) -> dict[str, Any]:
                return {
                    "operationId": f"{verb}{gvk[0]['kind']}",
                    "parameters": params,
                    "responses": {"200": {"description": "OK"}},
                    "x-kubernetes-action": verb,
                    "x-kubernetes-group-version-kind": gvk[0],
                }

            scope = "/namespaces/{namespace}" if res.namespaced else ""
            base = f"/apis/{g}/{v}{scope}/{res.plural}"
            paths[base] = {"post": op("post"), "get": op("list")}
            paths[base + "/{name}"] = {"put": op("put"), "patch": op("patch"), "get": op("get")}
            if res.status_subresource:
                paths[base + "/{name}/status"] = {"put": op("put"), "patch": op("patch"), "get": op("get")}
        if not schemas:
            raise ApiError(404, "NotFound", f"no OpenAPI document for {g}/{v}")
        return web.json_response(
            {
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": "v1.31.0"},
                "paths": paths,
                "components": {"schemas": schemas},
            }
        )

    def _table(self, res: Resource, objs: list[dict[str, Any]], rv: str) -> dict[str, Any]:
        columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        for c in res.columns:
            columns.append(
                {
                    "name": c["name"],
                    "type": c["type"],
                    "format": c.get("format", ""),
                    "description": c.get("description", ""),
                    "priority": c.get("priority", 0),
                }
            )
        specs = [(c["jsonPath"], c["type"]) for c in res.columns]  # checked at load
        if not any(c["name"] == "Age" for c in res.columns):
            columns.append({"name": "Age", "type": "date", "format": "", "description": "", "priority": 0})
            specs.append((".metadata.creationTimestamp", "date"))
        rows = []
        for o in objs:
            cells: list[Any] = [o["metadata"]["name"]]
            for p, kind in specs:
                cells.append(_cell(o, p, kind))
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o["metadata"],
                    },
                }
            )
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": rv},
            "columnDefinitions": columns,
            "rows": rows,
        }

    @staticmethod
    def _is_watch(request: web.Request) -> bool:
        return request.query.get("watch") in ("1", "true")

    @staticmethod
    def _wants_table(request: web.Request) -> bool:
        return "as=Table" in request.headers.get("Accept", "")

    async def _list(self, request: web.Request) -> web.StreamResponse:
        res = self._resource(request)
        ns = request.match_info.get("ns") if res.namespaced else None
        q = request.query
        sel = Selector.parse(res, q.get("labelSelector", ""), q.get("fieldSelector", ""))
        if self._is_watch(request):
            return await self._watch(request, res, ns, sel)
        objs = self.select(res, ns, sel)
        if self._wants_table(request):
            return web.json_response(self._table(res, objs, str(self.rv)))
        return web.json_response(
            {
                "apiVersion": res.api_version,
                "kind": res.list_kind,
                "metadata": {"resourceVersion": str(self.rv)},
                "items": objs,
            }
        )

    async def _watch(
        self, request: web.Request, res: Resource, ns: str | None, sel: Selector
    ) -> web.StreamResponse:
        """A watch as kube-apiserver serves it: from a resourceVersion (410 Gone once
        compacted away), objects entering or leaving the selection seen as ADDED and
        DELETED, and bookmarks when asked for (``allowWatchBookmarks``)."""
        since = request.query.get("resourceVersion", "")
        timeout = float(request.query.get("timeoutSeconds", "0") or 0) or None
        self.watch_timeouts.append(timeout)
        bookmarks = request.query.get("allowWatchBookmarks") in ("1", "true")
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.watchers.add(queue)
        node = next((v for k, op, v in sel.fields if k == "spec.nodeName" and op == "="), None)
        self._watching.setdefault((res.plural, node), set()).add(queue)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        def matches(plural: str, obj: dict[str, Any] | None) -> bool:
            return (
                obj is not None
                and plural == res.plural
                and (ns is None or obj["metadata"].get("namespace") == ns)
                and sel.matches(obj)
            )

        def seen_as(event: Event) -> str | None:
            _, plural, kind, obj, old = event
            now, before = matches(plural, obj), matches(plural, old)
            if kind == "DELETED":
                return "DELETED" if before or now else None
            if kind == "MODIFIED" and before != now:
                return "ADDED" if now else "DELETED"
            return kind if now else None

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        try:
            if request.query.get("sendInitialEvents") in ("1", "true"):
                # A streaming list (WatchList; kubectl wait uses it): the current objects,
                # then a bookmark marking the end of the initial events.
                for obj in self.select(res, ns, sel):
                    await send("ADDED", obj)
                meta = {"resourceVersion": str(self.rv), "annotations": {"k8s.io/initial-events-end": "true"}}
                await send("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta})
            elif since in ("", "0"):
                for obj in self.select(res, ns, sel):
                    await send("ADDED", obj)
            else:
                start = int(since)
                oldest = self.events[0][0] if self.events else self.rv + 1
                if start < self.compacted or (start < oldest - 1 and start < self.rv):
                    gone = ApiError(410, "Expired", f"too old resource version: {start} ({oldest - 1})")
                    await send("ERROR", gone.status())
                    return response
                for event in list(self.events):
                    if event[0] > start and (kind := seen_as(event)) is not None:
                        await send(kind, event[3])
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if bookmarks:
                    wait = self.bookmark_s if wait is None else min(wait, self.bookmark_s)
                try:
                    item = await wait_within(queue.get(), wait)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    meta = {"resourceVersion": str(self.rv)}
                    await send(
                        "BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}
                    )
                    continue
                if item is None:
                    break
                if (kind := seen_as(item)) is not None:
                    await send(kind, item[3])
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.discard(queue)
            self._watching[(res.plural, node)].discard(queue)
        return response

    async def _body(self, request: web.Request) -> Any:
        text = await request.text()
        if not text:
            raise ApiError(400, "BadRequest", "empty body")
        return json.loads(text)

    async def _create(self, request: web.Request) -> web.Response:
        res = self._resource(request)
        warnings: list[str] = []
        body = await self._body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        obj = self.create(
            res, self._ns(request), body, _manager(request), self._validation(request), warnings
        )
        return self._respond(obj, warnings, 201)

    async def _get(self, request: web.Request) -> web.Response:
        res = self._resource(request)
        obj = self.get(res, self._ns(request), request.match_info["name"])
        if self._wants_table(request):
            return web.json_response(self._table(res, [obj], obj["metadata"]["resourceVersion"]))
        return web.json_response(obj)

    def _status_path(self, request: web.Request, res: Resource) -> bool:
        status = request.match_info.get("sub") == "status"
        if status and not res.status_subresource:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return status

    async def _put(self, request: web.Request) -> web.Response:
        res = self._resource(request)
        status = self._status_path(request, res)
        body = await self._body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be a JSON object")
        warnings: list[str] = []
        obj = self.replace(
            res,
            self._ns(request),
            request.match_info["name"],
            body,
            status,
            _manager(request),
            self._validation(request),
            warnings,
        )
        return self._respond(obj, warnings)

    async def _patch(self, request: web.Request) -> web.Response:
        res = self._resource(request)
        status = self._status_path(request, res)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        body = await self._body(request)
        warnings: list[str] = []
        obj = self.patch(
            res,
            self._ns(request),
            request.match_info["name"],
            content_type,
            body,
            status,
            _manager(request),
            self._validation(request),
            warnings,
        )
        return self._respond(obj, warnings)

    async def _delete(self, request: web.Request) -> web.Response:
        res = self._resource(request)
        obj = self.delete(res, self._ns(request), request.match_info["name"])
        return web.json_response(obj)

    async def close_watches(self) -> None:
        for q in list(self.watchers):
            q.put_nowait(None)

    async def forget_history(self) -> None:
        """Compact everything and end the open watches: every client's next watch from a
        resourceVersion it had gets 410 Gone and must relist."""
        self.compact()
        self.compact()
        await self.close_watches()


def _manager(request: web.Request) -> str:
    """The field manager: ``?fieldManager=``, else the client's user agent up to the first
    "/" (what kube-apiserver does)."""
    return request.query.get("fieldManager") or request.headers.get("User-Agent", "unknown").split("/")[0]


class RunningEmulator:
    """An emulator listening on host:port (``async with``)."""

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator, self.host, self.port = emulator, host, port
        self._runner: web.AppRunner | None = None
        self._compactor: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self.emulator.compact_s:
            self._compactor = asyncio.create_task(self._compact_every(self.emulator.compact_s))
        self._runner = web.AppRunner(self.emulator.app(), access_log=None)
        await self._runner.setup()
        # A relay with a thousand gateways opens two thousand watches at once.
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _compact_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.emulator.compact()

    async def stop(self) -> None:
        if self._compactor is not None:
            self._compactor.cancel()
        await self.emulator.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> RunningEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def kubeconfig(self, path: Path, namespace: str = "default", token: str = "emulator") -> Path:
        """A kubeconfig for kubectl and Kubernetes clients pointing at the emulator
        (``token``: whose rights, see ``rbac``)."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "dev", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "dev", "namespace": namespace},
                        }
                    ],
                    "current-context": "emulator",
                }
            )
        )
        return path
