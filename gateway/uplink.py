"""The gateway's uplink: one gRPC stream to the cloud relay (mutual TLS), draining the
twin engine's outbox and taking desired values from the cloud.

* Status: each device's composed outbox entry goes up as one ``status`` message,
  devices whose entry carries state or desired acknowledgements first, within the link
  budget (a token bucket of ``budget_bps`` bytes/s over frame payloads). An entry leaves
  the outbox only when the relay answers ``applied`` for its revision and only if it has
  not changed since (``TwinEngine.outbox_acked``); a changed entry is sent again.
* Spec: ``upsert`` of a Device the gateway serves carries its ``spec.properties[].desired``;
  a desired value the cloud has not sent before is applied with origin ``cloud`` under
  the engine's conflict rule.
* The link: frames numbered and acknowledged (``deviceapi.wire``), keepalive pings every
  10 s with a 10 s timeout so a dead or half-open link is noticed within 30 s, reconnects
  with exponential backoff and jitter; after a reconnect every outbox entry is offered
  again (the relay's rule makes replays harmless) and the spec resumes from the last
  resourceVersion seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import grpc

from deviceapi.proto.edgetwin.sync.v1 import sync_pb2, sync_pb2_grpc
from deviceapi.types import device_id
from deviceapi.wire import (
    CLOUD_TO_EDGE,
    PROTOCOL_VERSION,
    Incoming,
    Outgoing,
    WireError,
    decode_batch,
    encode_batch,
)
from gateway.config import UplinkConfig
from gateway.twin.engine import DesiredRejected, TwinEngine
from gateway.twin.hlc import Stamp

log = logging.getLogger(__name__)

KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def _priority(patch: dict[str, Any]) -> int:
    """0 for device state and desired acknowledgements, 1 for reported values only."""
    if "state" in patch or "conditions" in patch:
        return 0
    twins = patch.get("twins") or {}
    return 0 if any("observedDesired" in t for t in twins.values() if isinstance(t, dict)) else 1


def cloud_stamp(meta: dict[str, Any]) -> Stamp | None:
    """When the Device's spec was last written in the cloud: the newest
    ``metadata.managedFields[].time`` outside the status subresource (kube-apiserver
    keeps these, to the second). The conflict rule compares it with edge stamps."""
    latest: int | None = None
    for entry in meta.get("managedFields") or []:
        if not isinstance(entry, dict) or entry.get("subresource") or not entry.get("time"):
            continue
        try:
            when = datetime.strptime(str(entry["time"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            continue
        ms = int(when.timestamp() * 1000)
        latest = ms if latest is None else max(latest, ms)
    return None if latest is None else Stamp(latest)


class Uplink:
    def __init__(
        self,
        cfg: UplinkConfig,
        engine: TwinEngine,
        changed: Callable[[], None],
        resume: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.changed = changed  # tells the gateway to commit
        # The last resourceVersion seen of each kind; persisted by the gateway's commits
        # (take_resume), so a restarted gateway resumes instead of relisting.
        self.resume: dict[str, str] = dict(resume or {})
        self._resume_dirty = False
        self.connected = asyncio.Event()
        self.bytes_sent = 0
        self.applied = 0
        self.connects = 0
        self._cloud_desired: dict[tuple[str, str], str] = {}
        self._unknown_warned: set[str] = set()

    async def run(self) -> None:
        delay = self.cfg.reconnect_min_ms / 1000
        while True:
            try:
                await self._session()
                delay = self.cfg.reconnect_min_ms / 1000
            except (grpc.aio.AioRpcError, WireError, OSError) as exc:
                log.warning(
                    "uplink down", extra={"error": str(exc).splitlines()[0] if str(exc) else repr(exc)}
                )
            except Exception as exc:  # a bug must not end the uplink: log it, reconnect
                log.error("uplink failed", exc_info=exc)
            finally:
                self.connected.clear()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(self.cfg.reconnect_max_ms / 1000, delay * 2)

    def take_resume(self) -> str | None:
        """The resume point as JSON if it changed since the last call (for the store)."""
        if not self._resume_dirty:
            return None
        self._resume_dirty = False
        return json.dumps(self.resume, sort_keys=True)

    def _set_resume(self, kind: str, rv: str) -> None:
        if rv and self.resume.get(kind) != rv:
            self.resume[kind] = rv
            self._resume_dirty = True
            self.changed()

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.cfg.ca_file.read_bytes(), self.cfg.key_file.read_bytes(), self.cfg.cert_file.read_bytes()
        )

    async def _session(self) -> None:
        options: list[tuple[str, int | str]] = list(KEEPALIVE_OPTIONS)
        if self.cfg.server_name:
            options.append(("grpc.ssl_target_name_override", self.cfg.server_name))
        async with grpc.aio.secure_channel(self.cfg.address, self._credentials(), options=options) as channel:
            queue: asyncio.Queue[sync_pb2.Frame] = asyncio.Queue()
            out: Outgoing[list[tuple[str, int]]] = Outgoing(window=32)
            inc = Incoming()
            in_flight: dict[str, int] = {}

            async def frames() -> AsyncIterator[sync_pb2.Frame]:
                while True:
                    yield await queue.get()

            def send(messages: list[dict[str, Any]], meta: list[tuple[str, int]]) -> int:
                encoding, payload = encode_batch(messages)
                seq = out.send(encoding, payload, meta)
                queue.put_nowait(sync_pb2.Frame(seq=seq, ack=inc.ack, encoding=encoding, payload=payload))  # type: ignore[arg-type]
                self.bytes_sent += len(payload)
                return len(payload)

            call = sync_pb2_grpc.SyncStub(channel).Link(frames())  # type: ignore[no-untyped-call]
            send([{"t": "hello", "proto": PROTOCOL_VERSION, "resume": dict(self.resume)}], [])
            sender = asyncio.create_task(self._drain(send, out, in_flight))
            self.connects += 1
            self.connected.set()
            try:
                async for frame in call:
                    if frame.ack:
                        out.on_ack(frame.ack)
                    if frame.seq and inc.accept(frame.seq):
                        for msg in decode_batch(frame.encoding, frame.payload, CLOUD_TO_EDGE):
                            self._handle(msg, in_flight)
                        queue.put_nowait(sync_pb2.Frame(seq=0, ack=inc.ack))
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender

    async def _drain(
        self,
        send: Callable[[list[dict[str, Any]], list[tuple[str, int]]], int],
        out: Outgoing[list[tuple[str, int]]],
        in_flight: dict[str, int],
    ) -> None:
        budget = float(self.cfg.budget_bps)
        tokens, last = budget, time.monotonic()
        while True:
            entries = [
                (_priority(e.patch), dev, e)
                for dev, e in self.engine.outbox.items()
                if in_flight.get(dev) != e.revision
            ]
            if not entries or not out.can_send:
                await asyncio.sleep(0.05)
                continue
            entries.sort(key=lambda x: (x[0], x[2].revision))
            batch = entries[: self.cfg.batch_max]
            messages = [
                {"t": "status", "dev": dev, "rev": e.revision, "patch": e.patch} for _, dev, e in batch
            ]
            for _, dev, e in batch:
                in_flight[dev] = e.revision
            size = send(messages, [(dev, e.revision) for _, dev, e in batch])
            # The budget: wait until the link has carried this frame.
            now = time.monotonic()
            tokens = min(budget, tokens + (now - last) * budget) - size
            last = now
            if tokens < 0:
                await asyncio.sleep(-tokens / budget)
            else:
                await asyncio.sleep(0)

    def _handle(self, msg: dict[str, Any], in_flight: dict[str, int]) -> None:
        kind = msg["t"]
        if kind in ("applied", "refused"):
            dev, rev = msg["dev"], msg["rev"]
            if kind == "refused":
                log.warning("relay refused status", extra={"device": dev, "reason": msg["reason"]})
            if in_flight.get(dev) == rev:
                del in_flight[dev]
            if self.engine.outbox_acked(dev, rev):
                self.applied += 1
            self.changed()
        elif kind == "upsert":
            obj = msg["obj"]
            meta = obj.get("metadata") or {}
            self._set_resume(msg["kind"], str(meta.get("resourceVersion", "")))
            if msg["kind"] == "Device":
                dev = device_id(meta.get("namespace", ""), meta.get("name", ""))
                self._cloud_spec(dev, obj.get("spec") or {}, cloud_stamp(meta))
        elif kind in ("delete", "synced"):
            self._set_resume(msg["kind"], msg["rv"])

    def _cloud_spec(self, dev: str, spec: dict[str, Any], stamp: Stamp | None) -> None:
        if dev not in self.engine.devices:
            # Devices are defined by the gateway's manifests; one created in the cloud is
            # not served until it is added there (and the gateway restarted).
            if dev not in self._unknown_warned:
                self._unknown_warned.add(dev)
                log.warning(
                    "device added in the cloud is not in this gateway's manifests; not served",
                    extra={"device": dev},
                )
            return
        now = int(time.time() * 1000)
        if stamp is None:  # an API server that keeps no managedFields: when it reached us
            stamp = Stamp(now)
        for prop in spec.get("properties") or []:
            desired = prop.get("desired") if isinstance(prop, dict) else None
            if not isinstance(desired, dict) or "value" not in desired:
                continue
            key, value = (dev, str(prop.get("name"))), str(desired["value"])
            if self._cloud_desired.get(key) == value:
                continue  # seen before: not a new cloud write
            self._cloud_desired[key] = value
            try:
                self.engine.apply_desired(dev, key[1], value, "cloud", now, stamp=stamp)
            except DesiredRejected as exc:
                log.warning("cloud desired value rejected", extra={"device": dev, "error": str(exc)})
            self.changed()
