"""One established uplink stream: frame numbering and compression, status batches paced
to the link's budget, answers from the relay (applied, refused, cloud changes), and the
watchdog that ends a stream when nothing arrives for ``dead_after_s``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from edgetwin.gateway.config import UplinkConfig
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.twin.outbox import OutboxEntry
from edgetwin.gateway.uplink_channel import LinkCall
from edgetwin.runtime.aio import wait_within
from edgetwin.runtime.logs import RateLimit
from edgetwin.sync.frame import Frame
from edgetwin.sync.packed import StatusPacker
from edgetwin.sync.wire import (
    ACK_DELAY_S,
    CAP_APPLIED_REVS,
    CLOUD_TO_EDGE,
    PROTOCOL_VERSION,
    AckTimer,
    FrameDecoder,
    FrameEncoder,
    Incoming,
    Outgoing,
    pack_batch,
)

log = logging.getLogger("edgetwin.gateway.uplink")

# A stream that stayed up this long was healthy: the next reconnect starts from the
# shortest backoff again.
HEALTHY_S = 5.0
RETRY_MIN_S, RETRY_MAX_S = 5.0, 300.0  # status the relay could not apply yet
REFUSED_WAIT_S = 600.0  # status the relay refused (another node's device)
# A gateway with no resume point (a new or lost store) waits for the relist of its
# Devices before sending status, so their cloud status is adopted first (versions go on
# above it); at most this long.
HOLD_MAX_S = 60.0
STATS_MIN_S, STATS_S = 5.0, 30.0


# Refusals are logged at most 10 a minute (a site whose devices the cluster does not
# have yet would otherwise log one line per device).
_refusals = RateLimit()


# Messages whose frame's acknowledgement may wait (see Stream.read).
_LAZY = frozenset({"rv", "applied", "appliedRevs", "refused"})


class LinkDead(Exception):
    """Nothing arrived from the relay for too long."""


def split_patch(patch: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """A status patch as parts of at most about ``limit`` bytes (msgpack), each a status
    patch of its own (the relay applies each on its own): the device-level fields, then
    the properties, as many to a part as fit. A property larger than ``limit`` is a part
    by itself (a value is at most 16 KiB, so it still fits a frame)."""
    if len(msgpack.packb(patch)) <= limit:
        return [patch]
    parts: list[dict[str, Any]] = []
    current: dict[str, Any] = {k: v for k, v in patch.items() if k != "twins"}
    size = len(msgpack.packb(current)) if current else 0
    for name, entry in (patch.get("twins") or {}).items():
        entry_size = len(msgpack.packb({name: entry}))
        if current and size + entry_size > limit:
            parts.append(current)
            current, size = {}, 0
        current.setdefault("twins", {})[name] = entry
        size += entry_size
    if current:
        parts.append(current)
    return parts


@dataclass
class _Deferral:
    until: float
    backoff: float


# Earlier messages of a device's chain remembered for their answers (see _InFlight).
EARLIER_MAX = 8


@dataclass
class _InFlight:
    rev: int
    parts: set[int] = field(default_factory=set)
    chain: int = 0  # the revision that began its device's chain (see Stream.chains)
    taken_ms: int = 0  # wall ms when its patch was taken: every later change is younger
    # Earlier whole messages of the chain not answered yet, (revision, taken_ms), oldest
    # first: the answer to one of them means the cloud is only that far behind
    # (TwinEngine.outbox_progress), which matters for a device changing faster than
    # answers come back.
    earlier: list[tuple[int, int]] = field(default_factory=list)


class StreamOwner(Protocol):
    """What a stream uses of its :class:`~edgetwin.gateway.uplink.Uplink`."""

    cfg: UplinkConfig
    engine: TwinEngine
    deferred: dict[str, _Deferral]
    devices: Callable[[], tuple[int, int]]
    applied: int
    bytes_received: int
    bytes_sent: int
    frames_acked: int
    frames_sent: int
    last_rx_at: float | None
    resume: dict[str, str]
    store_id: str
    version: str
    wake: asyncio.Event
    connected: asyncio.Event

    @property
    def holding(self) -> bool: ...

    def changed(self) -> None: ...

    def handle(self, msg: dict[str, Any], stream: Stream) -> None: ...


class Stream:
    """One stream's state: numbering, compression, in-flight status, pacing."""

    def __init__(self, uplink: StreamOwner, call: LinkCall) -> None:
        self.up = uplink
        self.call = call
        cfg = uplink.cfg
        self.budget = float(cfg.budget_bps)
        # Raw (msgpack) bytes per frame: frame_s of the budget, at a conservative 4x
        # compression; the in-flight window a few frames of it.
        self.frame_raw = max(4096, int(cfg.budget_bps * cfg.frame_s)) * 4
        self.out: Outgoing[list[tuple[str, int, int | None]]] = Outgoing(
            window=32, window_bytes=max(64 * 1024, self.frame_raw * 3)
        )
        self.inc = Incoming()
        self.encoder = FrameEncoder()
        self.decoder = FrameDecoder()
        self.in_flight: dict[str, _InFlight] = {}
        self.rev_dev: dict[int, str] = {}  # in_flight by revision, for appliedRevs
        # Per device, (first, last) revision of what this stream sent: the first whole,
        # each later one only what changed since the one before (OutboxEntry.patch_since).
        # The relay folds a device's messages in order, so an ``applied`` of the last
        # covers the chain, unless one of them was refused or dropped unsent: then the
        # chain is gone and the entry goes whole again.
        self.chains: dict[str, tuple[int, int]] = {}
        self.deltas = False  # the relay's welcome named statusDeltas
        self.packer: StatusPacker | None = None  # set if it named packedStatus
        # Parts of entries too large for one frame, waiting for their frames:
        # (device, revision, index, count, patch).
        self.parts: collections.deque[tuple[str, int, int, int, dict[str, Any]]] = collections.deque()
        self.acks = AckTimer()
        self.last_rx = time.monotonic()
        self.last_echo = 0.0
        self.stats_sent: tuple[int, int, int, int | None] | None = None
        self.stats_at = 0.0

    # ----------------------------------------------------------------- inbound
    async def read(self) -> None:
        while True:
            frame = await self.call.read()
            if frame is None:
                raise ConnectionError("the relay closed the stream")
            self.last_rx = self.up.last_rx_at = time.monotonic()
            self.up.bytes_received += len(frame.payload)
            if frame.ack:
                if frame.ack > self.out.acked:
                    self.up.frames_acked += 1
                self.out.on_ack(frame.ack)  # the window opens; the answers say what was applied
                self.up.wake.set()
            lazy = False
            if frame.seq and self.inc.accept(frame.seq):
                messages = self.decoder.decode(frame.encoding, frame.payload, CLOUD_TO_EDGE)
                for msg in messages:
                    self.up.handle(msg, self)
                # Only resume points moved on, or answers came: nothing waits for this
                # ack (a new stream sends the outbox again anyway), so it rides on the
                # next data frame or heartbeat instead of costing a frame of its own.
                lazy = bool(messages) and all(m["t"] in _LAZY for m in messages)
            if frame.seq:
                delay = self.up.cfg.heartbeat_ms / 1000 if lazy else ACK_DELAY_S
                self.acks.received(time.monotonic(), delay)
                self.up.wake.set()

    def answered(self, msg: dict[str, Any]) -> None:
        dev, rev = msg["dev"], msg["rev"]
        if msg["t"] == "refused":
            self.chains.pop(dev, None)  # a later delta would not carry what was refused
        flight = self.in_flight.get(dev)
        if flight is None:
            return
        if flight.rev != rev:  # an answer to an older revision: a newer one is on its way
            if msg["t"] == "applied" and "part" not in msg:
                self._progress(dev, flight, rev)
            return
        if msg["t"] == "refused":
            self._land(dev)
            previous = self.up.deferred.get(dev)
            if msg.get("retry"):
                backoff = min(RETRY_MAX_S, previous.backoff * 2) if previous else RETRY_MIN_S
            else:
                backoff = REFUSED_WAIT_S
            self.up.deferred[dev] = _Deferral(time.monotonic() + backoff * random.uniform(0.8, 1.2), backoff)
            if previous is None and _refusals.allow("refused"):
                log.warning(
                    "relay could not apply status; kept and retried",
                    extra={"device": dev, "reason": msg["reason"], "retry_s": round(backoff)},
                )
            return
        flight.parts.discard(msg.get("part", 0))
        if flight.parts:
            return
        self._land(dev)
        self.up.deferred.pop(dev, None)
        chain = self.chains.get(dev)
        if self.deltas and (chain is None or chain[0] != flight.chain):
            self.up.changed()  # part of its chain is missing: the entry goes whole again
            return
        if self.up.engine.outbox_acked(dev, rev):
            self.chains.pop(dev, None)
            self.up.applied += 1
        else:  # it changed since it was taken: pending only since then
            self.up.engine.outbox_progress(dev, rev, flight.taken_ms)
        self.up.changed()

    def _progress(self, dev: str, flight: _InFlight, rev: int) -> None:
        """An earlier message of the device's chain was applied (see _InFlight.earlier).
        With deltas it stands for the chain up to it only while the chain is unbroken."""
        index = next((i for i, (r, _) in enumerate(flight.earlier) if r == rev), None)
        if index is None:
            return
        chain = self.chains.get(dev)
        if self.deltas and (chain is None or chain[0] != flight.chain):
            return
        taken_ms = flight.earlier[index][1]
        for r, _ in flight.earlier[: index + 1]:
            self.rev_dev.pop(r, None)
        del flight.earlier[: index + 1]
        self.up.engine.outbox_progress(dev, rev, taken_ms)

    def _fly(self, dev: str, flight: _InFlight) -> None:
        if (old := self.in_flight.get(dev)) is not None:
            # Whole messages each stand alone; deltas only within their chain.
            same_chain = old.chain == flight.chain or not self.deltas
            earlier = old.earlier if same_chain else []
            if not same_chain:
                for r, _ in old.earlier:
                    self.rev_dev.pop(r, None)
            if same_chain and old.parts == {0} and old.rev != flight.rev:
                earlier.append((old.rev, old.taken_ms))
            else:
                self.rev_dev.pop(old.rev, None)
            while len(earlier) > EARLIER_MAX:
                self.rev_dev.pop(earlier.pop(0)[0], None)
            flight.earlier = earlier
        self.in_flight[dev] = flight
        self.rev_dev[flight.rev] = dev

    def _land(self, dev: str) -> None:
        flight = self.in_flight.pop(dev)
        self.rev_dev.pop(flight.rev, None)
        for r, _ in flight.earlier:
            self.rev_dev.pop(r, None)

    # ----------------------------------------------------------------- outbound
    def _due_entries(self) -> list[tuple[str, OutboxEntry]]:
        now = time.monotonic()
        due = []
        for dev, entry in self.up.engine.outbox.items():
            flight = self.in_flight.get(dev)
            if flight is not None and flight.rev == entry.revision:
                continue
            deferral = self.up.deferred.get(dev)
            if deferral is not None and deferral.until > now:
                continue
            due.append((dev, entry))
        due.sort(key=lambda d: (not d[1].urgent, d[1].revision))
        return due

    def _next_deferral(self) -> float | None:
        times = [d.until for dev, d in self.up.deferred.items() if dev in self.up.engine.outbox]
        return min(times) if times else None

    def _status_batch(self) -> tuple[list[dict[str, Any]], list[tuple[str, int, int | None]]]:
        """The next frame's status messages: queued parts of a large entry first, then
        whole entries by priority, up to ``frame_raw`` bytes and ``batch_max`` messages."""
        outbox = self.up.engine.outbox
        taken_ms = self.up.engine.now_ms()
        messages: list[dict[str, Any]] = []
        metas: list[tuple[str, int, int | None]] = []
        size = 0
        while self.parts:
            dev, rev, index, count, part = self.parts[0]
            entry = outbox.get(dev)
            if entry is None or entry.revision != rev:  # superseded: the new revision goes whole
                self.parts.popleft()
                self.chains.pop(dev, None)
                continue
            part_size = len(msgpack.packb(part))
            if messages and size + part_size > self.frame_raw:
                return messages, metas
            self.parts.popleft()
            messages.append({"t": "status", "dev": dev, "rev": rev, "patch": part, "part": [index, count]})
            metas.append((dev, rev, index))
            size += part_size
        if messages:
            return messages, metas
        for dev, entry in self._due_entries():
            if len(messages) >= self.up.cfg.batch_max:
                break
            chain = self.chains.get(dev) if self.deltas else None
            patch = entry.patch_since(chain[1]) if chain else entry.patch
            first = chain[0] if chain else entry.revision
            entry_size = len(msgpack.packb(patch))
            if entry_size > self.frame_raw:
                parts = split_patch(patch, self.frame_raw)
                self._fly(dev, _InFlight(entry.revision, set(range(len(parts))), first, taken_ms))
                self.chains[dev] = (first, entry.revision)
                self.parts.extend((dev, entry.revision, i, len(parts), part) for i, part in enumerate(parts))
                if messages:
                    break  # this frame goes as it is; the parts follow
                return self._status_batch()
            if messages and size + entry_size > self.frame_raw:
                break
            self._fly(dev, _InFlight(entry.revision, {0}, first, taken_ms))
            self.chains[dev] = (first, entry.revision)
            messages.append({"t": "status", "dev": dev, "rev": entry.revision, "patch": patch})
            metas.append((dev, entry.revision, None))
            size += entry_size
        return messages, metas

    def _stats_wait(self, now: float) -> tuple[tuple[int, int, int, int | None], float | None]:
        """The current stats, and seconds until they may go (None: nothing new to send).
        A change of a device count or of the backlog to or from empty is urgent."""
        served, not_ready = self.up.devices()
        backlog, since_ms = self.up.engine.backlog()
        current = (served, not_ready, backlog, since_ms)
        before = self.stats_sent
        if before is None or current == before:
            return current, None
        urgent = before[:2] != current[:2] or (before[2] == 0) != (backlog == 0)
        return current, max(0.0, self.stats_at + (STATS_MIN_S if urgent else STATS_S) - now)

    def _stats(self, now: float, force: bool = False) -> dict[str, Any] | None:
        """A ``stats`` message if one is due (see the module), else None."""
        current, wait = self._stats_wait(now)
        if not force and (wait is None or wait > 0):
            return None
        served, not_ready, backlog, since_ms = current
        self.stats_sent, self.stats_at = current, now
        age = max(0, int(time.time() * 1000) - since_ms) if since_ms is not None else 0
        return {
            "t": "stats",
            "s": {"devices": served, "devicesNotReady": not_ready, "backlog": backlog, "oldestMs": age},
        }

    async def _send(self, messages: list[dict[str, Any]], meta: list[tuple[str, int, int | None]]) -> int:
        if self.packer is not None:
            messages = self.packer.pack(messages)
        raw = pack_batch(messages)
        encoding, payload = self.encoder.encode(raw)
        seq = self.out.send(raw, meta)
        self.acks.carried(self.inc.ack)
        await self.call.write(Frame(seq=seq, ack=self.inc.ack, encoding=encoding, payload=payload))
        self.up.bytes_sent += len(payload)
        self.up.frames_sent += 1
        return len(payload)

    async def write(self) -> None:
        up, cfg = self.up, self.up.cfg
        hello = {
            "t": "hello",
            "proto": PROTOCOL_VERSION,
            "resume": dict(up.resume),
            "bps": cfg.budget_down_bps or cfg.budget_bps,
            "store": up.store_id,
            "version": up.version,
            "caps": [CAP_APPLIED_REVS],
        }
        first = self._stats(time.monotonic(), force=True)
        await self._send([hello, first] if first else [hello], [])
        tokens, last = self.budget, time.monotonic()
        gathered_since: float | None = None
        while True:
            now = time.monotonic()
            tokens, last = min(self.budget, tokens + (now - last) * self.budget), now
            if (
                up.connected.is_set()
                and not up.holding
                and self.out.can_send
                and tokens >= 0
                and (self.parts or self._due_entries())
            ):
                # Gather a little (batch_window) so a frame carries many updates.
                if gathered_since is None:
                    gathered_since = now
                wait = gathered_since + cfg.batch_window_ms / 1000 - now
                if wait <= 0:
                    messages, metas = self._status_batch()
                    if messages:
                        if stats := self._stats(now):
                            messages.append(stats)  # rides along
                        tokens -= await self._send(messages, metas)
                        gathered_since = None
                        continue
                    gathered_since = None
            else:
                gathered_since = None
                wait = 1.0
            if up.connected.is_set() and self.out.can_send and (stats := self._stats(now)):
                tokens -= await self._send([stats], [])
                continue
            # The heartbeat first: it carries any ack owed (a lazy one falls due with it).
            silent = now - self.last_rx
            if silent >= cfg.heartbeat_ms / 1000 and now - self.last_echo >= cfg.heartbeat_ms / 1000:
                self.last_echo = now
                self.acks.carried(self.inc.ack)
                await self.call.write(Frame(seq=0, ack=self.inc.ack, echo=True))
                continue
            ack_wait = self.acks.wait(self.inc.ack, now)
            if ack_wait == 0:
                self.acks.carried(self.inc.ack)
                await self.call.write(Frame(seq=0, ack=self.inc.ack))
                continue
            # Sleep until: a wake (outbox change, ack, frame to acknowledge), the end of
            # the gathering window, the budget refilling, a deferral ending, or the next
            # heartbeat.
            deadlines = [cfg.heartbeat_ms / 1000 - silent, wait]
            if ack_wait is not None:
                deadlines.append(ack_wait)
            if (
                up.connected.is_set()
                and self.out.can_send
                and (stats_wait := self._stats_wait(now)[1]) is not None
            ):
                deadlines.append(stats_wait)
            if tokens < 0:
                deadlines.append(-tokens / self.budget)
            if (retry_at := self._next_deferral()) is not None:
                deadlines.append(retry_at - now)
            up.wake.clear()
            with contextlib.suppress(TimeoutError):
                await wait_within(up.wake.wait(), max(0.01, min(deadlines)))

    async def watchdog(self) -> None:
        dead_after = self.up.cfg.dead_after_ms / 1000
        while True:
            silent = time.monotonic() - self.last_rx
            if silent >= dead_after:
                raise LinkDead(f"nothing from the relay for {silent:.0f} s (dead or half-open link)")
            await asyncio.sleep(min(1.0, dead_after - silent + 0.01))
