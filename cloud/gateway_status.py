"""The ``Gateway`` resource of each node (``deploy/crds/gateways.edgetwin.io.yaml``),
written by the relay so that ``kubectl get gateways`` tells which sites are offline and
how stale their data is.

What is written, from what the relay knows:

* ``Connected`` condition: True while a sync stream of the node is up; False with the
  reason the last one ended (``LinkDead``: the heartbeat stopped; ``Closed``; ``Error``),
  or ``NoHeartbeat`` when no relay replica has refreshed it for ``stale_after_s`` (a relay
  that died cannot say its streams ended: every replica sweeps for such Gateways);
* ``lastSeenTime``: when a frame last came from the gateway;
* ``devices``, ``devicesNotReady``, ``backlog``, ``oldestPendingTime``: from the gateway's
  ``stats`` messages; as of the last contact while it is disconnected (the cloud cannot
  know more, and says so with ``lastSeenTime``);
* ``version``, ``protocol``, ``storeId`` from its hello; ``relay``: this replica.

Bounded API load per gateway: a connect or disconnect is written at once (at most one
write per ``min_gap_s``), other changes at most once per ``interval_s``, and an unchanged
connected gateway once per ``heartbeat_s`` (to refresh ``lastSeenTime``). The sweep is
one list of Gateways per ``heartbeat_s``. With the defaults (5 s, 30 s, 60 s) a fleet of
1,000 idle gateways costs about 17 writes per second, busy ones at most 34.

The decision of when to write is pure (:class:`GatewayState`); :class:`GatewayReporter`
does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_global_resource
from lightkube.types import PatchType

from edgetwin.runtime.aio import wait_within
from edgetwin.runtime.logs import RateLimit

log = logging.getLogger(__name__)

Gateway = create_global_resource("edgetwin.io", "v1alpha1", "Gateway", "gateways")

STATS_KEYS = ("devices", "devicesNotReady", "backlog")


@dataclass
class GatewayTiming:
    min_gap_s: float = 5.0
    interval_s: float = 30.0
    heartbeat_s: float = 60.0
    stale_after_s: float = 180.0


def iso(wall_s: float) -> str:
    """RFC 3339 with milliseconds, as the Device status times are written."""
    moment = datetime.fromtimestamp(wall_s, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class GatewayState:
    """What the relay knows of one node's gateway, and when it last wrote it."""

    node: str
    streams: int = 0
    connected: bool = False
    reason: str = ""
    message: str = ""
    transition_wall: float = 0.0
    seen_wall: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    oldest_wall: float | None = None
    hello: dict[str, Any] = field(default_factory=dict)
    transition_due: bool = False
    changed: bool = False
    last_write: float = float("-inf")  # monotonic

    def due(self, now: float, timing: GatewayTiming) -> bool:
        """Whether a write is due at monotonic ``now``."""
        since = now - self.last_write
        if self.transition_due:
            return since >= timing.min_gap_s
        if self.changed:
            return since >= timing.interval_s
        return self.connected and since >= timing.heartbeat_s

    def status(self, relay: str) -> dict[str, Any]:
        """The status merge patch to write."""
        condition = {
            "type": "Connected",
            "status": "True" if self.connected else "False",
            "reason": self.reason,
            "message": self.message[:1024],
            "lastTransitionTime": iso(self.transition_wall),
        }
        status: dict[str, Any] = {"conditions": [condition], "relay": relay}
        if self.seen_wall:
            status["lastSeenTime"] = iso(self.seen_wall)
        for key in STATS_KEYS:
            if key in self.stats:
                status[key] = self.stats[key]
        status["oldestPendingTime"] = None if self.oldest_wall is None else iso(self.oldest_wall)
        if self.hello:
            status["version"] = str(self.hello.get("version") or "")[:63]
            status["protocol"] = int(self.hello.get("proto") or 0)
            status["storeId"] = str(self.hello.get("store") or "")[:63]
        return status


class GatewayReporter:
    """Keeps every node's Gateway status current, at a bounded rate (see the module)."""

    def __init__(
        self,
        client: AsyncClient,
        relay: str,
        timing: GatewayTiming | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client, self.relay = client, relay
        self.timing = timing or GatewayTiming()
        self.wall = wall
        self.nodes: dict[str, GatewayState] = {}
        self.writes = 0
        self._wake = asyncio.Event()
        self._ratelimit = RateLimit(burst=3, per_s=300)
        self._created: set[str] = set()

    def _state(self, node: str) -> GatewayState:
        state = self.nodes.get(node)
        if state is None:
            state = self.nodes[node] = GatewayState(node)
        return state

    # ----------------------------------------------------------------- events
    def connected(self, node: str, hello: dict[str, Any]) -> None:
        state = self._state(node)
        state.streams += 1
        state.hello = dict(hello)
        state.seen_wall = self.wall()
        if not state.connected:
            state.connected, state.reason, state.message = True, "Streaming", "the sync stream is up"
            state.transition_wall = state.seen_wall
            state.transition_due = True
            self._wake.set()

    def seen(self, node: str) -> None:
        """A frame came from the node's gateway (cheap: called per frame)."""
        state = self.nodes.get(node)
        if state is not None:
            state.seen_wall = self.wall()

    def stats(self, node: str, stats: dict[str, Any]) -> None:
        """The gateway's ``stats`` message: counts, and the age of its oldest pending
        status in milliseconds (made a time here, so clock skew does not matter)."""
        state = self._state(node)
        counts = {
            key: int(value)
            for key, value in stats.items()
            if key in STATS_KEYS and isinstance(value, int) and not isinstance(value, bool) and value >= 0
        }
        age = stats.get("oldestMs")
        oldest = None
        if isinstance(age, int | float) and not isinstance(age, bool) and 0 <= age < 10 * 365 * 86_400_000:
            oldest = self.wall() - age / 1000 if counts.get("backlog") else None
        if counts != state.stats or _moved(state.oldest_wall, oldest):
            state.stats, state.oldest_wall = counts, oldest
            state.changed = True
            self._wake.set()

    def disconnected(self, node: str, reason: str, message: str) -> None:
        state = self._state(node)
        state.streams = max(0, state.streams - 1)
        if state.streams == 0 and state.connected:
            state.connected, state.reason, state.message = False, reason, message
            state.transition_wall = self.wall()
            state.transition_due = True
            self._wake.set()

    # ----------------------------------------------------------------- I/O
    async def run(self) -> None:
        """Write what is due; sweep for Gateways no relay refreshes. Runs until cancelled."""
        next_sweep = time.monotonic() + self.timing.heartbeat_s / 2
        while True:
            now = time.monotonic()
            for state in list(self.nodes.values()):
                if state.due(now, self.timing):
                    await self._write(state)
            if now >= next_sweep:
                next_sweep = now + self.timing.heartbeat_s
                await self._sweep()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await wait_within(self._wake.wait(), self._next_wait(time.monotonic(), next_sweep))

    def _next_wait(self, now: float, next_sweep: float) -> float:
        wait = next_sweep - now
        t = self.timing
        for s in self.nodes.values():
            if s.transition_due:
                wait = min(wait, s.last_write + t.min_gap_s - now)
            elif s.changed:
                wait = min(wait, s.last_write + t.interval_s - now)
            elif s.connected:
                wait = min(wait, s.last_write + t.heartbeat_s - now)
        return max(0.05, wait)

    async def _write(self, state: GatewayState) -> None:
        body = {"status": state.status(self.relay)}
        state.last_write = time.monotonic()
        transition, changed = state.transition_due, state.changed
        state.transition_due = state.changed = False
        try:
            await self._patch(state.node, body)
            self.writes += 1
        except Exception as exc:  # an API outage must not stop the reporter
            # Tried again after the gap: the flags come back.
            state.transition_due, state.changed = transition, changed or state.changed
            if self._ratelimit.allow("write"):
                log.warning(
                    "cannot write the Gateway status; retrying",
                    extra={"node": state.node, "error": _describe(exc)},
                )

    async def _patch(self, node: str, body: dict[str, Any]) -> None:
        try:
            await self.client.patch(Gateway.Status, node, body, patch_type=PatchType.MERGE)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise
            # The first contact of this node (or someone deleted its Gateway): create it.
            gateway = Gateway.from_dict(
                {
                    "apiVersion": "edgetwin.io/v1alpha1",
                    "kind": "Gateway",
                    "metadata": {"name": node},
                    "spec": {},
                }
            )
            with contextlib.suppress(httpx.HTTPStatusError):  # 409: another replica made it meanwhile
                await self.client.create(gateway)
            await self.client.patch(Gateway.Status, node, body, patch_type=PatchType.MERGE)

    async def _sweep(self) -> None:
        """Mark disconnected the Gateways that claim to be connected but that no relay
        replica has refreshed for ``stale_after_s`` (their relay died)."""
        try:
            gateways = [g async for g in self.client.list(Gateway)]
        except Exception as exc:  # the next sweep tries again
            if self._ratelimit.allow("sweep"):
                log.warning("cannot list Gateways", extra={"error": _describe(exc)})
            return
        now = self.wall()
        for gw in gateways:
            name = gw.metadata.name if gw.metadata else None
            raw = gw.get("status")
            status: dict[str, Any] = raw if isinstance(raw, dict) else {}
            if not name or (name in self.nodes and self.nodes[name].connected):
                continue
            connected = any(
                isinstance(c, dict) and c.get("type") == "Connected" and c.get("status") == "True"
                for c in status.get("conditions") or ()
            )
            seen = _parse_time(status.get("lastSeenTime"))
            if connected and (seen is None or now - seen > self.timing.stale_after_s):
                condition = {
                    "type": "Connected",
                    "status": "False",
                    "reason": "NoHeartbeat",
                    "message": f"no relay has heard from this gateway for {self.timing.stale_after_s:.0f} s "
                    "(its relay stopped without closing the stream)",
                    "lastTransitionTime": iso(now),
                }
                try:
                    await self._patch(name, {"status": {"conditions": [condition], "relay": self.relay}})
                    self.writes += 1
                except Exception as exc:  # the next sweep tries again
                    if self._ratelimit.allow("sweep"):
                        log.warning(
                            "cannot write the Gateway status", extra={"node": name, "error": _describe(exc)}
                        )


def _moved(before: float | None, after: float | None) -> bool:
    """Whether the oldest pending time moved (beyond the jitter of frame latency)."""
    if before is None or after is None:
        return (before is None) != (after is None)
    return abs(after - before) > 5.0


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return f"{exc.status.code} {exc.status.reason}: {exc.status.message}"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"{exc.response.status_code}: {exc.response.text[:200]}"
    return str(exc) or type(exc).__name__
