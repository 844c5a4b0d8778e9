"""The gateway's uplink: one gRPC stream to the cloud relay (mutual TLS), draining the
twin engine's outbox and bringing the cluster's Device and DeviceModel changes down.

* **Status.** Each device's composed outbox entry goes up as one ``status`` message
  (devices whose entry carries state, conditions or desired acknowledgements first),
  gathered for ``batch_window`` and paced by a token bucket at ``budget_bps`` bytes/s
  of frame payload. A frame holds at most ``frame_s`` seconds of the budget, so a
  heartbeat is never queued behind more than that; an entry larger than a frame is
  sent in parts. An entry leaves the outbox only when the relay answers ``applied``
  for its revision (all its parts) and only if it has not changed since
  (``TwinEngine.outbox_acked``). ``refused`` with ``retry`` (the Device does not exist
  yet) keeps the entry and tries again with backoff (5 s doubling to 5 min), or at once
  when the Device appears; a refusal without retry (another node's Device) waits 10 min.
  Nothing is dropped: the outbox is bounded by the devices' properties.
* **Cloud to edge.** ``upsert``/``delete``/``synced``/``rv`` messages go to the gateway
  (``on_cloud``), which applies them; their resourceVersions become the resume point.
* **Health.** ``stats`` (devices served and not ready, the outbox backlog and the age
  of its oldest entry) go with the hello and again when they change: at once (at most
  every ``STATS_MIN_S``) when a count of devices changes or the backlog empties or
  starts, else at most every ``STATS_S``. The relay writes them to the node's Gateway.
* **The link.** A frame with ``echo`` after ``heartbeat_s`` of silence; nothing received
  for ``dead_after_s`` (default 27 s, so a dead or half-open link is noticed within 30 s
  however busy the stream was) ends the stream. Reconnects back off exponentially with
  jitter, starting over after a healthy stream (one that was up ``HEALTHY_S``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from edgetwin.gateway.config import UplinkConfig
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.uplink_channel import LinkCall, LinkError, TlsSessions, tls_context
from edgetwin.gateway.uplink_stream import (
    HEALTHY_S,
    HOLD_MAX_S,
    Stream,
    _Deferral,
)
from edgetwin.runtime.logs import RateLimit
from edgetwin.sync.packed import StatusPacker
from edgetwin.sync.wire import (
    CAP_PACKED_STATUS,
    CAP_STATUS_DELTAS,
    WireError,
    decode_revs,
)

log = logging.getLogger(__name__)
_retries = RateLimit(burst=1, per_s=60.0)  # 'still down' lines, now and then


class Uplink:
    """The link to the relay. ``on_cloud`` takes each cloud-to-edge message about objects
    (upsert, delete, synced, rv); ``changed`` tells the gateway to commit."""

    def __init__(
        self,
        cfg: UplinkConfig,
        engine: TwinEngine,
        changed: Callable[[], None],
        on_cloud: Callable[[dict[str, Any]], None],
        resume: dict[str, str] | None = None,
        store_id: str = "",
        version: str = "",
        devices: Callable[[], tuple[int, int]] = lambda: (0, 0),
    ) -> None:
        self.cfg = cfg
        self.devices = devices  # (served, not ready), for stats
        self.engine = engine
        self.changed = changed
        self.on_cloud = on_cloud
        self.store_id = store_id
        self.version = version
        # The last resourceVersion seen of each kind; persisted by the gateway's commits
        # (take_resume), so a restarted gateway resumes instead of relisting.
        self.resume: dict[str, str] = dict(resume or {})
        self._resume_dirty = False
        self.connected = asyncio.Event()  # the relay welcomed the stream
        self.wake = asyncio.Event()  # the outbox changed, or something else to send
        self.deferred: dict[str, _Deferral] = {}
        # Counters (metrics, tests, benchmarks).
        self.bytes_sent = 0
        self.bytes_received = 0
        self.received: collections.Counter[str] = collections.Counter()  # messages by type
        self.frames_sent = 0
        self.applied = 0
        self.connects = 0
        self.last_error = ""
        self.connected_since: float | None = None
        self.last_rx_at: float | None = None
        self.stream: Stream | None = None  # the current stream, while one is open
        self.frames_acked = 0  # progress, for the health monitor
        self.failures = 0  # connection attempts failed in a row
        self._hold_until: float = 0.0
        self._tls: tuple[tuple[tuple[int, int], ...], TlsSessions] | None = None

    @property
    def frames_unacked(self) -> int:
        """Frames sent on the welcomed stream that the relay has not acknowledged."""
        stream = self.stream
        return len(stream.out.unacked) if stream is not None and self.connected.is_set() else 0

    @property
    def holding(self) -> bool:
        """Status waits for the relist of the Devices (see HOLD_MAX_S)."""
        return time.monotonic() < self._hold_until

    # ----------------------------------------------------------------- lifecycle
    async def run(self) -> None:
        delay = self.cfg.reconnect_min_ms / 1000
        while True:
            try:
                await self._session()
            except Exception as exc:
                self.last_error = describe(exc)
                self.failures = 0 if self.connected.is_set() else self.failures + 1
                if self.connected.is_set():  # an established stream ended: once per outage
                    log.warning("uplink down", extra={"relay": self.cfg.address, "error": self.last_error})
                elif _retries.allow("retry"):  # attempts while it stays down: now and then
                    log.info(
                        "uplink still down",
                        extra={
                            "relay": self.cfg.address,
                            "error": self.last_error,
                            "attempts": self.failures,
                        },
                    )
            healthy = (
                self.connected_since is not None and time.monotonic() - self.connected_since >= HEALTHY_S
            )
            self.connected.clear()
            self.connected_since = None
            if healthy:
                delay = self.cfg.reconnect_min_ms / 1000  # a healthy stream: start over
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(self.cfg.reconnect_max_ms / 1000, delay * 2)

    def notify(self) -> None:
        """The outbox changed: there may be something to send."""
        self.wake.set()

    def take_resume(self) -> str | None:
        """The resume point as JSON if it changed since the last call (for the store)."""
        if not self._resume_dirty:
            return None
        self._resume_dirty = False
        return json.dumps(self.resume, sort_keys=True)

    def set_resume(self, kind: str, rv: str) -> None:
        if rv and self.resume.get(kind) != rv:
            self.resume[kind] = rv
            self._resume_dirty = True
            self.changed()

    def retry_now(self, device_id: str) -> None:
        """The device appeared in the cluster: send its deferred status at once."""
        if self.deferred.pop(device_id, None) is not None:
            self.wake.set()

    def _context(self) -> TlsSessions:
        """The TLS context, made again when a certificate, key or CA file changed (a
        renewed certificate is used from the next connection); kept otherwise, so a
        reconnect resumes the TLS session instead of sending the certificates again."""
        files = (self.cfg.ca_file, self.cfg.cert_file, self.cfg.key_file)
        stamp = tuple((st.st_mtime_ns, st.st_size) for st in (f.stat() for f in files))
        if self._tls is None or self._tls[0] != stamp:
            self._tls = (stamp, tls_context(*files))
        return self._tls[1]

    async def _session(self) -> None:
        tls = self._context()
        call = LinkCall(self.cfg.address, tls, self.cfg.server_name, f"edgetwin/{self.version or 'dev'}")
        stream = self.stream = Stream(self, call)
        tasks = [
            asyncio.create_task(stream.read(), name="uplink read"),
            asyncio.create_task(stream.write(), name="uplink write"),
            asyncio.create_task(stream.watchdog(), name="uplink watchdog"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            error = next(iter(done)).exception()
            if error is not None:
                raise error
            raise ConnectionError("the relay ended the stream")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.close()
            tls.remember()
            self.stream = None

    # ----------------------------------------------------------------- messages from the relay
    def handle(self, msg: dict[str, Any], stream: Stream) -> None:
        kind = msg["t"]
        self.received[kind] += 1
        if kind == "welcome":
            caps = msg.get("caps") or []
            stream.deltas = CAP_STATUS_DELTAS in caps
            stream.packer = StatusPacker() if CAP_PACKED_STATUS in caps else None
            self.connects += 1
            self.connected_since = time.monotonic()
            self._hold_until = 0.0 if self.resume.get("Device") else time.monotonic() + HOLD_MAX_S
            self.connected.set()
            log.info("uplink connected", extra={"relay": self.cfg.address, "resume": json.dumps(self.resume)})
        elif kind in ("applied", "refused"):
            stream.answered(msg)
        elif kind == "appliedRevs":
            for rev in decode_revs(msg["revs"]):
                if (dev := stream.rev_dev.get(rev)) is not None:
                    stream.answered({"t": "applied", "dev": dev, "rev": rev})
        else:
            if kind in ("delete", "synced", "rv"):
                self.set_resume(msg["kind"], msg["rv"])
            if kind == "synced" and msg["kind"] == "Device" and self._hold_until:
                self._hold_until = 0.0
                self.wake.set()
            elif kind == "upsert":
                meta = msg["obj"].get("metadata") or {}
                self.set_resume(msg["kind"], str(meta.get("resourceVersion", "")))
            self.on_cloud(msg)


def describe(exc: BaseException) -> str:
    """An error for the log: gRPC status and details, not the multi-line repr."""
    if isinstance(exc, LinkError):
        details = exc.details.strip().splitlines()
        return f"{exc.code}: {details[0] if details else 'no details'}"
    if isinstance(exc, WireError):
        return f"bad frame from the relay: {exc}"
    return str(exc) or type(exc).__name__
