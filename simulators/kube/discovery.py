"""What the emulator says about itself: discovery documents (``/api``, ``/apis``, each
group version), ``/version``, OpenAPI v3, events, and Table output from the CRDs'
printer columns, as kubectl asks for them."""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from edgetwin.simulators.kube.objects import (
    ApiError,
    Resource,
    _cell,
)
from edgetwin.simulators.kube.store import ObjectStore


class DiscoveryDocs(ObjectStore):
    """The emulator's self-description; its handlers are routed by :class:`Emulator`."""

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
