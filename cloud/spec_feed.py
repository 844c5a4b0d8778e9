"""What one node may see of one kind, as sync messages (``deviceapi.wire``): from the
gateway's last seen resourceVersion only what changed since; with none, or one the API
server no longer remembers (410 Gone), a relist: every object, then ``synced`` with the
names that exist so the gateway can drop the rest. Built on lightkube.

* **Selecting a node's Devices.** By the field selector ``spec.nodeName=<node>`` (CRD
  ``selectableFields``, Kubernetes 1.31+), or where the API server refuses that field
  (older clusters, or the feature gate off: 400 "field label not supported") by the
  label ``edgetwin.io/node=<node>``. Either way every object's ``spec.nodeName`` is
  checked again before it travels: labels are anyone's to set, and a Device that moved
  to another node is sent as a delete.
* **Only spec changes travel.** Status or metadata changes keep ``metadata.generation``;
  within a stream the generation last sent per object filters them. On a resumed stream
  an object whose ``status.observedGeneration`` equals its generation (the gateway
  reported having applied this spec, from the same store) is not sent again either: the
  relay's own status writes never come back to the edge as echoes.
* **The resume point stays current.** The watch asks for bookmarks; when nothing was
  sent for a while, an ``rv`` message moves the gateway's resume point on, so a
  reconnect after an hour resumes instead of relisting (the API server forgets history
  older than its compaction window).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import httpx
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError

log = logging.getLogger(__name__)

NODE_LABEL = "edgetwin.io/node"
SelectorMode = Literal["auto", "field", "label"]
# An ``rv`` message at most this often per kind (when the resume point moved).
RV_EVERY_S = 60.0
# The API server is asked to end each watch after WATCH_S to 2 x WATCH_S (it is then
# resumed), at random as client-go's reflectors do: a thousand gateways that connected
# together would otherwise all start their watches again in the same few seconds every
# WATCH_S, an apiQPS bucket's worth of requests that hold status writes back.
WATCH_S = 290
WATCH_SILENCE_S = 150.0
# API server errors worth retrying (with backoff) rather than ending the stream.
RETRIED_CODES = frozenset({429, 500, 502, 503, 504})
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0


async def list_objects(client: AsyncClient, res: Any, params: dict[str, str]) -> Any:
    """One list request for ``res`` in every namespace through lightkube's client (its
    config, auth and TLS); the JSON answer as a dict. Raises lightkube's ApiError, or
    httpx's errors."""
    inner: Any = client._client  # lightkube: its request builder, auth and TLS
    br = inner.prepare_request("list", res=res, namespace="*", params=params)
    resp = await inner.send(inner.build_adapter_request(br))
    if resp.status_code >= 400:
        raise ApiError(response=resp)
    return resp.json()


class FieldSelectorUnsupported(Exception):
    """The API server refused ``spec.nodeName`` as a field selector."""


class NodeFeed:
    """Devices (or any namespaced kind) of ``node``; with ``node=None`` every object of
    the kind (DeviceModels carry no node)."""

    def __init__(
        self,
        client: AsyncClient,
        res: Any,
        kind: str,
        node: str | None,
        mode: SelectorMode = "auto",
        rv_every_s: float = RV_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.res, self.kind, self.node = client, res, kind, node
        self.mode: SelectorMode = mode
        self.rv_every_s = rv_every_s
        self.clock = clock
        self.rv = ""  # the newest resourceVersion seen
        self.sent_rv = ""  # the newest one the gateway was told of
        self._sent_at = clock()
        self.relists = 0
        self.skipped = 0  # objects not sent: status-only changes, unchanged on resume
        # Generation last sent per object (namespace/name) on this stream.
        self._generation: dict[str, int] = {}
        # On a resumed stream: the gateway's store, for the observedGeneration rule.
        self._store = ""
        # Objects a delete was sent for on this stream (so it is sent once).
        self._deleted: set[str] = set()
        self.api_errors = 0

    # ----------------------------------------------------------------- selection
    @property
    def _by_field(self) -> bool:
        return self.node is not None and self.mode != "label"

    def selector(self) -> dict[str, str]:
        """The list parameters that select this feed's objects (as detected so far: the
        field selector, or the label where the API server refused the field)."""
        return self._params()

    def _params(self) -> dict[str, str]:
        if self.node is None:
            return {}
        if self._by_field:
            return {"fieldSelector": f"spec.nodeName={self.node}"}
        return {"labelSelector": f"{NODE_LABEL}={self.node}"}

    def _mine(self, obj: dict[str, Any]) -> bool:
        return self.node is None or (obj.get("spec") or {}).get("nodeName") == self.node

    def _field_refused(self, exc: ApiError) -> bool:
        unsupported = "field label not supported" in (exc.status.message or "")
        if not (self.mode == "auto" and self._by_field and exc.status.code == 400 and unsupported):
            return False
        log.info(
            "the API server does not select Devices by spec.nodeName (no CRD selectableFields, "
            "Kubernetes < 1.31); selecting by the label instead",
            extra={"label": f"{NODE_LABEL}={self.node}"},
        )
        self.mode = "label"
        return True

    # ----------------------------------------------------------------- messages
    def _key(self, meta: dict[str, Any]) -> str:
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    def _delete(self, meta: dict[str, Any]) -> dict[str, Any]:
        self._generation.pop(self._key(meta), None)
        return {
            "t": "delete",
            "kind": self.kind,
            "ns": meta.get("namespace", ""),
            "name": meta.get("name", ""),
            "rv": self.rv,
        }

    def _known_at_edge(self, obj: dict[str, Any]) -> bool:
        """The gateway (this same store) reported having applied this spec."""
        status = obj.get("status") or {}
        generation = (obj.get("metadata") or {}).get("generation") or 0
        return (
            bool(self._store)
            and status.get("edgeStore") == self._store
            and status.get("observedGeneration") == generation
        )

    def _upsert(self, obj: dict[str, Any], resumed: bool) -> dict[str, Any] | None:
        meta = obj.get("metadata") or {}
        key = self._key(meta)
        generation = meta.get("generation") or 0
        if self._generation.get(key) == generation or (resumed and self._known_at_edge(obj)):
            self._generation[key] = generation
            self.skipped += 1
            return None
        self._generation[key] = generation
        self.sent_rv, self._sent_at = self.rv, self.clock()
        return {"t": "upsert", "kind": self.kind, "obj": obj}

    def _rv_due(self) -> dict[str, Any] | None:
        if self.rv and self.rv != self.sent_rv and self.clock() - self._sent_at >= self.rv_every_s:
            self.sent_rv, self._sent_at = self.rv, self.clock()
            return {"t": "rv", "kind": self.kind, "rv": self.rv}
        return None

    # ----------------------------------------------------------------- list / watch
    async def _relist(self, resumed: bool) -> AsyncIterator[dict[str, Any]]:
        self.relists += 1
        while True:
            try:
                raw = await self._request(self._params())
                break
            except ApiError as exc:
                if not self._field_refused(exc):
                    raise
        names = []
        for obj in raw.get("items") or []:
            obj.setdefault("apiVersion", raw.get("apiVersion"))
            obj.setdefault("kind", self.kind)
            if not self._mine(obj):
                continue
            meta = obj.get("metadata") or {}
            names.append(self._key(meta))
            msg = self._upsert(obj, resumed)
            if msg is not None:
                yield msg
        self.rv = str((raw.get("metadata") or {}).get("resourceVersion", ""))
        self.sent_rv, self._sent_at = self.rv, self.clock()
        yield {"t": "synced", "kind": self.kind, "names": names, "rv": self.rv}

    async def _request(self, params: dict[str, str]) -> Any:
        return await list_objects(self.client, self.res, params)

    async def _watch(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Watch events (type, object as a dict) from ``self.rv``, with bookmarks; ends
        when the API server closes the watch (it is asked to within WATCH_S)."""
        inner: Any = self.client._client  # lightkube: its request builder, auth and TLS
        params = {
            **self._params(),
            "resourceVersion": self.rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(random.randrange(WATCH_S, 2 * WATCH_S)),
        }
        br = inner.prepare_request("list", res=self.res, namespace="*", watch=True, params=params)
        # Bookmarks arrive about once a minute: a watch silent for much longer is dead.
        timeout = httpx.Timeout(10.0, read=WATCH_SILENCE_S)
        req = inner._client.build_request(br.method, br.url, params=br.params, timeout=timeout)
        resp = await inner.send(req, stream=True)
        try:
            if resp.status_code >= 400:
                await resp.aread()
                raise ApiError(response=resp)
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise ApiError(status=obj)
                yield kind, obj
        finally:
            await resp.aclose()

    async def messages(self, resume_rv: str = "", store: str = "") -> AsyncIterator[dict[str, Any]]:
        """Sync messages until cancelled. ``store``: the gateway's store id from its
        hello (the observedGeneration rule applies only to the same store). API server
        failures are retried with backoff; the stream to the gateway stays up."""
        self.rv = self.sent_rv = resume_rv
        self._store = store
        resumed = bool(resume_rv)
        delay = RETRY_MIN_S
        while True:
            try:
                if not self.rv:
                    async for msg in self._relist(resumed):
                        yield msg
                async for kind, obj in self._watch():
                    delay = RETRY_MIN_S
                    out = self._event(kind, obj, resumed)
                    if out is not None:
                        self.sent_rv, self._sent_at = self.rv, self.clock()
                        yield out
                    elif (due := self._rv_due()) is not None:
                        yield due
            except ApiError as exc:
                if exc.status.code == 410:  # too old: the API server forgot; start over
                    log.info("watch expired; relisting", extra={"kind": self.kind, "node": self.node})
                    self.rv = ""
                    continue
                if self._field_refused(exc):
                    continue
                if exc.status.code not in RETRIED_CODES:
                    raise
                self.api_errors += 1
                log.warning(
                    "API server error on watch; retrying",
                    extra={"kind": self.kind, "code": exc.status.code, "error": exc.status.message},
                )
            except (httpx.TransportError, json.JSONDecodeError) as exc:
                self.api_errors += 1
                log.warning(
                    "API server unreachable on watch; retrying",
                    extra={"kind": self.kind, "error": str(exc) or type(exc).__name__},
                )
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(RETRY_MAX_S, delay * 2)

    def _event(self, kind: str, obj: dict[str, Any], resumed: bool) -> dict[str, Any] | None:
        meta = obj.get("metadata") or {}
        self.rv = str(meta.get("resourceVersion", self.rv))
        if kind == "BOOKMARK":
            return None
        key = self._key(meta)
        if kind == "DELETED" or not self._mine(obj):
            # Gone, or moved to another node (a label watch still sees it): once.
            if key in self._generation or (resumed and key not in self._deleted):
                self._deleted.add(key)
                return self._delete(meta)
            return None
        if kind in ("ADDED", "MODIFIED"):
            self._deleted.discard(key)
            return self._upsert(obj, resumed)
        return None
