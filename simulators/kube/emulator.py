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
import json
import time
from typing import Any

from aiohttp import web

from edgetwin.runtime.aio import wait_within
from edgetwin.simulators.kube.discovery import DiscoveryDocs
from edgetwin.simulators.kube.objects import (
    ApiError,
    Event,
    Resource,
    Selector,
)


class Emulator(DiscoveryDocs):
    """The API state served as an aiohttp application."""

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
