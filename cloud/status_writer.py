"""Writes one node's edge status to Device status: at most once per device per
``min_interval`` however fast messages come, only for the node's own devices, with
re-reads on 409 Conflict. Built on lightkube (the Kubernetes client) and the pure rule
in :mod:`cloud.status_merge`.

Messages for a device that arrive while a write is pending are folded into that write
(the rule is order-insensitive and idempotent), so API server load is bounded by
devices / ``min_interval``; a message at a newer revision supersedes older ones still
waiting (see :meth:`StatusWriter.submit`). Each :meth:`StatusWriter.submit` resolves when
its message is in the API server (``applied``), never will be (``refused``), or was
superseded (cancelled: composed into the newer revision's message, whose answer is the
one the gateway waits for).

Writes start only as :class:`WriteSlots` (the relay's request pool, shared by every
node's writer) allows, the nodes taking turns; a device waiting for its write, which
under ``apiQPS`` is every device for minutes, is a packed message and a place in line,
not a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
from lightkube import AsyncClient
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import PatchType

from edgetwin.cloud import ops
from edgetwin.cloud.spec_feed import list_objects
from edgetwin.cloud.status_merge import merge_edge_status
from edgetwin.sync.patch import compose_into

log = logging.getLogger(__name__)

Device = create_namespaced_resource("edgetwin.io", "v1alpha1", "Device", "devices")
MAX_CONFLICT_RETRIES = 10
# The first list of a node's Devices (see StatusWriter._seed) takes at most this many
# (one page); a node's devices beyond it are read one by one.
SEED_MAX = 500


@dataclass(frozen=True)
class Outcome:
    """How a status message ended. Not applied with ``retry``: not yet (the Device does
    not exist yet: the gateway keeps it and tries again later); without: never as things
    stand (another node's Device)."""

    applied: bool
    reason: str = ""
    retry: bool = False


class WriteSlots:
    """At most ``size`` status writes in flight for all the writers sharing it (the
    relay's request pool: more would queue inside the HTTP client, whose pool scans its
    whole queue on every request and response, quadratic: a relay with 100 gateways
    draining spent its core there). Writers waiting for a slot take turns, one write each
    (round robin), so a node with a thousand devices ready does not hold up the others;
    a device waiting for its write costs no task (under ``apiQPS`` every device of every
    gateway waits, and a task each was ~1.5 KB a device, scripts/bench/fleet.py)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1 (got {size})")
        self.free = size
        self._waiting: dict[StatusWriter, None] = {}  # insertion-ordered: the line

    def want(self, writer: StatusWriter) -> None:
        """``writer`` has a write ready: it gets a slot now or in its turn."""
        self._waiting.setdefault(writer, None)
        self._grant()

    def release(self) -> None:
        """A write ended (however): its slot goes to the next in line."""
        self.free += 1
        self._grant()

    def forget(self, writer: StatusWriter) -> None:
        self._waiting.pop(writer, None)

    def _grant(self) -> None:
        while self.free > 0 and self._waiting:
            writer = next(iter(self._waiting))
            del self._waiting[writer]
            if writer._start_one():
                self.free -= 1
                if writer._wants_slot():
                    self._waiting[writer] = None  # to the back of the line


@dataclass
class _Pending:
    # The newest revision's patches, packed (msgpack): under apiQPS every device of every
    # gateway has one waiting here, and as Python objects a fleet device's took ~4.8 KB,
    # packed a few hundred bytes (scripts/bench/fleet.py at 300 gateways, apiQPS 30).
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    waiters: list[asyncio.Future[Outcome]] = field(default_factory=list)
    last_write: float = float("-inf")


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_diff(old[key], value)
    return patch


class StatusWriter:
    """Status writes for the devices of ``node``."""

    def __init__(
        self,
        client: AsyncClient,
        node: str,
        min_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_concurrent: int = 16,
        shared: WriteSlots | None = None,
    ) -> None:
        self.client = client
        self.node = node
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._pending: dict[tuple[str, str], _Pending] = {}
        # Each device's last known state (see _write): one entry per device of the node
        # written during this stream, so bounded by the node's devices.
        self._known: dict[tuple[str, str], _Known] = {}
        self.writes = 0
        self.conflicts = 0
        # At most this many API requests in flight for the node: bounds API server load
        # and the client's connection pool when a thousand devices drain at once...
        self._cap = max_concurrent
        # ...and at most so many for all nodes together (None: this writer alone).
        self._slots = shared or WriteSlots(max_concurrent)
        # Each device with messages is in exactly one of: waiting out min_interval (a
        # timer), ready for a slot (in line), or being written (its task).
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._ready: dict[tuple[str, str], None] = {}  # insertion-ordered: the line
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._closed = False
        # The list parameters that select the node's Devices (set by the relay's session
        # from its Device feed). With them, the first write that needs a read lists the
        # node's Devices once instead (see _seed).
        self.list_params: Callable[[], dict[str, str]] | None = None
        self._seeding: asyncio.Task[None] | None = None
        self.seeded = 0  # devices whose first read came from the list

    def submit(self, namespace: str, name: str, rev: int, patch: dict[str, Any]) -> asyncio.Future[Outcome]:
        """Queue one edge status message; the future says how it ended."""
        key = (namespace, name)
        p = self._pending.setdefault(key, _Pending())
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        # A device's messages on a stream are its outbox entry at some revision, or (to a
        # relay that welcomed ``statusDeltas``) what changed since the one before: either
        # way the newest revision composed over the older ones still waiting is the entry
        # at that revision, and the gateway heeds only the answer to the newest revision
        # it sent. So the older messages are composed into one (edgetwin.sync.patch) and
        # their waiters cancelled, never answered: what waits per device stays one entry
        # however long writes are held back (apiQPS, minStatusInterval). Parts of one
        # revision wait side by side.
        newest = max((r for r, _ in p.messages), default=0)
        if rev < newest:
            fut.cancel()
            return fut
        if rev > newest:
            for old in p.waiters:
                old.cancel()
            if p.messages:
                folded: dict[str, Any] = {}
                for _, packed in sorted(p.messages, key=lambda m: m[0]):
                    compose_into(folded, msgpack.unpackb(packed, raw=False))
                compose_into(folded, patch)
                patch = folded
            p.messages, p.waiters = [], []
        p.messages.append((rev, msgpack.packb(patch, use_bin_type=True)))
        p.waiters.append(fut)
        self._schedule(key, p)
        return fut

    async def close(self) -> None:
        self._closed = True
        self._slots.forget(self)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._ready.clear()
        tasks = list(self._inflight.values())
        if self._seeding is not None:
            tasks.append(self._seeding)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ----------------------------------------------------------------- scheduling
    def _schedule(self, key: tuple[str, str], p: _Pending) -> None:
        """A device has messages: in line for a slot once min_interval has passed since
        its last write (nothing to do if it is already waiting or being written: what
        arrives meanwhile is folded into that write, or the next)."""
        if self._closed or key in self._timers or key in self._ready or key in self._inflight:
            return
        wait = p.last_write + self.min_interval_s - self.clock()
        if wait > 0:
            self._timers[key] = asyncio.get_running_loop().call_later(wait, self._due, key)
        else:
            self._due(key)

    def _due(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        self._ready[key] = None
        self._slots.want(self)

    def _wants_slot(self) -> bool:
        return bool(self._ready) and len(self._inflight) < self._cap and not self._closed

    def _start_one(self) -> bool:
        """Start the write of the next device in line (called by the slots)."""
        if not self._wants_slot():
            return False
        key = next(iter(self._ready))
        del self._ready[key]
        task = asyncio.create_task(self._flush(key, self._pending[key]), name=f"status {key[0]}/{key[1]}")
        self._inflight[key] = task
        task.add_done_callback(functools.partial(self._finished, key))
        return True

    def _finished(self, key: tuple[str, str], _task: asyncio.Task[None]) -> None:
        del self._inflight[key]
        self._slots.release()
        if self._closed:
            return
        p = self._pending[key]
        if p.messages:  # arrived during the write, or the write failed: the next one
            self._schedule(key, p)
        if self._ready:  # below the node's cap again
            self._slots.want(self)

    async def _flush(self, key: tuple[str, str], p: _Pending) -> None:
        messages, waiters = p.messages, p.waiters
        p.messages, p.waiters = [], []
        try:
            outcome = await self._write(key, messages)
        except Exception as exc:  # the API server is unreachable or broken: retry later
            log.warning("status write failed", extra={"device": "/".join(key), "error": repr(exc)})
            p.messages, p.waiters = messages + p.messages, waiters + p.waiters
            p.last_write = self.clock()
            return
        p.last_write = self.clock()
        for fut in waiters:
            if not fut.done():
                fut.set_result(outcome)

    async def _seed(self, params: dict[str, str]) -> None:
        """Read the node's Devices with one list, once per stream: after a relay restart
        every device's first write needs its current status, and one list of a node's
        devices costs one request where a read per device costs one each (a reconnect
        storm of 1,000 gateways x 20 devices: 1,000 requests instead of 20,000). Devices
        the list does not hold (created since, another node's) are read one by one as
        before; a failed list only means they all are."""
        # resourceVersion 0: any recent state will do (each write is conditional on the
        # object's resourceVersion), so the API server answers from its watch cache
        # instead of reading every Device from etcd to filter them by node.
        params = {**params, "resourceVersion": "0", "limit": str(SEED_MAX)}
        try:
            raw = await list_objects(self.client, Device, params)
        except Exception as exc:  # any failure: fall back to reads
            log.info(
                "listing the node's Devices failed; reading each",
                extra={"node": self.node, "error": repr(exc)},
            )
            return
        for obj in (raw.get("items") or [])[:SEED_MAX]:
            meta = obj.get("metadata") or {}
            key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
            if key not in self._known:  # never over what a write since brought back
                self._known[key] = _Known.of_dict(obj)
                self.seeded += 1

    async def _write(self, key: tuple[str, str], messages: list[tuple[int, bytes]]) -> Outcome:
        namespace, name = key
        for _ in range(MAX_CONFLICT_RETRIES):
            known = self._known.pop(key, None)
            if known is None and self.list_params is not None:
                if self._seeding is None:
                    self._seeding = asyncio.ensure_future(self._seed(self.list_params()))
                if not self._seeding.done():
                    await asyncio.shield(self._seeding)
                    known = self._known.pop(key, None)
            if known is None:
                try:
                    obj = await self.client.get(Device, name, namespace=namespace)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code == 404:
                        return Outcome(False, f"device {namespace}/{name} does not exist (yet)", retry=True)
                    raise
                known = _Known.of(obj)
            if known.node != self.node:
                return Outcome(
                    False, f"device {namespace}/{name} belongs to node {known.node!r}, not {self.node!r}"
                )
            before = status = known.status
            for rev, packed in sorted(messages, key=lambda m: m[0]):
                status = merge_edge_status(status, msgpack.unpackb(packed, raw=False), rev)
            if status == before:
                self._known[key] = known
                return Outcome(True)  # a replay: nothing new
            # The resourceVersion makes the write conditional: 409 if anyone wrote since.
            body = {"metadata": {"resourceVersion": known.rv}, "status": merge_diff(before, status)}
            try:
                # (Any: lightkube's overloads do not type the status subresource's
                # answer; at run time it is the whole Device.)
                written: Any = await self.client.patch(
                    Device.Status,
                    name,
                    body,
                    namespace=namespace,
                    patch_type=PatchType.MERGE,
                )
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == 409:  # written since we read it: read again
                    self.conflicts += 1
                    continue
                if exc.response.status_code == 404:
                    return Outcome(False, f"device {namespace}/{name} does not exist (yet)", retry=True)
                raise
            # The answer is the object as written: the next write starts from it without
            # a read (a conflict, when anyone else wrote since, sends it back to a read).
            self._known[key] = _Known.of(written)
            self.writes += 1
            ops.STATUS_WRITES.inc()
            ops.STATUS_FOLDED.inc(len(messages) - 1)
            return Outcome(True)
        raise RuntimeError(f"{MAX_CONFLICT_RETRIES} conflicts in a row writing {namespace}/{name}")


@dataclass(frozen=True)
class _Known:
    """A Device as last read or written by this writer: its resourceVersion, node and
    status. One is kept per device for as long as its gateway is connected, so status is
    kept as compact JSON: parsed, a fleet device's status took ~3 KB of Python objects,
    packed under 1 KB (scripts/bench/fleet.py); it is parsed once per write."""

    rv: str | None
    node: Any
    packed: bytes

    @property
    def status(self) -> dict[str, Any]:
        """A fresh copy of the status (the caller may change it)."""
        status: dict[str, Any] = json.loads(self.packed)
        return status

    @classmethod
    def of(cls, obj: Any) -> _Known:
        """From a lightkube object."""
        rv = obj.metadata.resourceVersion if obj.metadata is not None else None
        return cls._make(rv, obj.get("spec"), obj.get("status"))

    @classmethod
    def of_dict(cls, obj: dict[str, Any]) -> _Known:
        """From an object as JSON (a list's item)."""
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        return cls._make(rv if isinstance(rv, str) else None, obj.get("spec"), obj.get("status"))

    @classmethod
    def _make(cls, rv: str | None, spec: Any, status: Any) -> _Known:
        node = (spec if isinstance(spec, dict) else {}).get("nodeName")
        if isinstance(node, str):
            node = sys.intern(node)  # every Device of a node names it: one copy
        return cls(rv, node, json.dumps(status or {}, separators=(",", ":")).encode())
