"""The emulator's state: objects with resourceVersions from one counter, watch events
with bounded history and etcd-like compaction, admission by the CRD's schema, and the
fault injection tests use (conflicts, errors, slow answers)."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

import yaml

from edgetwin.simulators.kube.objects import (
    _DNS_SUBDOMAIN,
    DEFAULT_BOOKMARK_S,
    DEFAULT_COMPACT_S,
    DEFAULT_HISTORY,
    ApiError,
    Event,
    Resource,
    Selector,
    _invalid,
    _now,
    _record_manager,
    json_patch,
    merge_patch,
)
from edgetwin.simulators.kube.schema import FieldError


class ObjectStore:
    """The API state: objects, events and watchers."""

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
    def from_files(cls, paths: Iterable[Path], history: int = DEFAULT_HISTORY, **options: Any) -> Self:
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
