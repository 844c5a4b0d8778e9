"""The edge <-> cloud sync wire format: the batches inside a ``Frame`` of
``protos/edgetwin/sync/v1/sync.proto``, and the sequence/acknowledgement bookkeeping of
each direction. Pure: no sockets, no gRPC, no clocks. docs/sync-protocol.md explains it.

A batch is a msgpack array of messages, each a map with a type ``t``:

edge -> cloud
    ``hello``   ``{"t": "hello", "proto": 1, "resume": {"Device": rv, "DeviceModel": rv}}``:
                the last resourceVersion the gateway has seen of each kind ("" = none).
    ``status``  ``{"t": "status", "dev": "ns.name", "rev": 17, "patch": {...}}``: one
                composed outbox entry (Device status merge patch; ``twins`` keyed by
                property name) and its outbox revision.
cloud -> edge
    ``upsert``  ``{"t": "upsert", "kind": "Device", "obj": {...}}``: added or changed.
    ``delete``  ``{"t": "delete", "kind": "Device", "ns": "plant", "name": "x", "rv": "9"}``
    ``synced``  ``{"t": "synced", "kind": "Device", "names": ["ns/name", ...], "rv": "12"}``:
                after a relist (410 Gone), every object that exists now; the gateway drops
                the others.
    ``applied`` ``{"t": "applied", "dev": "ns.name", "rev": 17}``: the API server accepted
                the status of that outbox revision (the gateway may drop the entry if it
                has not changed since).
    ``refused`` ``{"t": "refused", "dev": "ns.name", "rev": 17, "reason": "..."}``: it never
                will (another node's device, a device that does not exist).

Frames are numbered per direction from 1 and acknowledged cumulatively: ``ack = n``
means every frame up to n has been applied. Unacknowledged frames are sent again after
a reconnect; a receiver skips a seq it has already applied (re-acknowledging it), so
replays are harmless.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack

PROTOCOL_VERSION = 1

ENCODING_MSGPACK = 1
ENCODING_MSGPACK_ZLIB = 2

# Bounds: a frame's payload on the wire, a batch decompressed (no zip bombs), and the
# messages in one batch. A sender splits work into batches that fit.
MAX_FRAME_BYTES = 1 << 20
MAX_BATCH_BYTES = 8 << 20
MAX_MESSAGES = 10_000

EDGE_TO_CLOUD = frozenset({"hello", "status"})
CLOUD_TO_EDGE = frozenset({"upsert", "delete", "synced", "applied", "refused"})

_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"proto": int, "resume": dict},
    "status": {"dev": str, "rev": int, "patch": dict},
    "upsert": {"kind": str, "obj": dict},
    "delete": {"kind": str, "ns": str, "name": str, "rv": str},
    "synced": {"kind": str, "names": list, "rv": str},
    "applied": {"dev": str, "rev": int},
    "refused": {"dev": str, "rev": int, "reason": str},
}


class WireError(ValueError):
    """A frame or batch is malformed; the message says what is wrong."""


def encode_batch(messages: list[dict[str, Any]], compress: bool = True) -> tuple[int, bytes]:
    """(encoding, payload) for a batch; raises :class:`WireError` if it exceeds the
    frame bound (split the batch)."""
    if len(messages) > MAX_MESSAGES:
        raise WireError(f"a batch holds at most {MAX_MESSAGES} messages, not {len(messages)}")
    raw = msgpack.packb(messages, use_bin_type=True)
    if len(raw) > MAX_BATCH_BYTES:
        raise WireError(f"batch of {len(raw)} bytes exceeds {MAX_BATCH_BYTES}")
    if compress:
        data, encoding = zlib.compress(raw, 6), ENCODING_MSGPACK_ZLIB
    else:
        data, encoding = raw, ENCODING_MSGPACK
    if len(data) > MAX_FRAME_BYTES:
        raise WireError(f"frame payload of {len(data)} bytes exceeds {MAX_FRAME_BYTES}; split the batch")
    return encoding, data


def decode_batch(
    encoding: int, payload: bytes, allowed: frozenset[str] | None = None
) -> list[dict[str, Any]]:
    """The messages of a frame, checked; raises :class:`WireError` naming the problem."""
    if len(payload) > MAX_FRAME_BYTES:
        raise WireError(f"frame payload of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    if encoding == ENCODING_MSGPACK_ZLIB:
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(payload, MAX_BATCH_BYTES + 1)
        except zlib.error as exc:
            raise WireError(f"payload is not valid zlib data: {exc}") from None
        if len(raw) > MAX_BATCH_BYTES or inflater.unconsumed_tail:
            raise WireError(f"decompressed batch exceeds {MAX_BATCH_BYTES} bytes")
        if not inflater.eof:
            raise WireError("payload is truncated zlib data")
    elif encoding == ENCODING_MSGPACK:
        raw = payload
    else:
        raise WireError(f"unknown payload encoding {encoding}")
    try:
        batch = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_array_len=MAX_MESSAGES * 4)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise WireError(f"payload is not a msgpack batch: {exc}") from None
    if not isinstance(batch, list):
        raise WireError(f"a batch is an array of messages, not {type(batch).__name__}")
    if len(batch) > MAX_MESSAGES:
        raise WireError(f"a batch holds at most {MAX_MESSAGES} messages, not {len(batch)}")
    for i, msg in enumerate(batch):
        check_message(msg, i, allowed)
    return batch


def check_message(msg: Any, index: int = 0, allowed: frozenset[str] | None = None) -> None:
    if not isinstance(msg, dict):
        raise WireError(f"message {index}: a map, not {type(msg).__name__}")
    kind = msg.get("t")
    if kind not in _REQUIRED:
        raise WireError(f"message {index}: unknown type {kind!r}")
    if allowed is not None and kind not in allowed:
        raise WireError(f"message {index}: {kind!r} is not sent in this direction")
    for key, typ in _REQUIRED[kind].items():
        value = msg.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise WireError(
                f"message {index} ({kind}): {key} must be {_name(typ)}, got {type(value).__name__}"
            )


def _name(typ: type | tuple[type, ...]) -> str:
    return typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)


M = TypeVar("M")


@dataclass
class Outgoing(Generic[M]):
    """One direction's sender side: numbers frames, keeps them until acknowledged, and
    gives them back to send again after a reconnect. ``meta`` rides along with each
    frame (e.g. which outbox revisions it carries) and comes back on acknowledgement.
    Bound: ``window`` unacknowledged frames; :attr:`can_send` is false when it is full."""

    window: int = 64
    next_seq: int = 1
    acked: int = 0
    unacked: OrderedDict[int, tuple[int, bytes, M]] = field(default_factory=OrderedDict)

    @property
    def can_send(self) -> bool:
        return len(self.unacked) < self.window

    def send(self, encoding: int, payload: bytes, meta: M) -> int:
        if not self.can_send:
            raise WireError(f"send window of {self.window} frames is full")
        seq = self.next_seq
        self.next_seq += 1
        self.unacked[seq] = (encoding, payload, meta)
        return seq

    def on_ack(self, ack: int) -> list[M]:
        """The metas of the frames this cumulative ack covers (each once)."""
        if ack >= self.next_seq:
            raise WireError(f"ack {ack} is for a frame never sent (last sent {self.next_seq - 1})")
        done: list[M] = []
        while self.unacked and next(iter(self.unacked)) <= ack:
            _, (_, _, meta) = self.unacked.popitem(last=False)
            done.append(meta)
        self.acked = max(self.acked, ack)
        return done

    def replay(self) -> list[tuple[int, int, bytes]]:
        """(seq, encoding, payload) of every unacknowledged frame, in order."""
        return [(seq, enc, data) for seq, (enc, data, _) in self.unacked.items()]


@dataclass
class Incoming:
    """One direction's receiver side: which frames to apply and what to acknowledge.
    A new stream starts from whatever seq arrives first (a restarted relay knows
    nothing); after that a seq at or below the last applied is a replay."""

    last: int | None = None

    def accept(self, seq: int) -> bool:
        """Whether to apply the frame (False: already applied, skip but acknowledge)."""
        if seq <= 0:
            raise WireError(f"frame seq {seq}: sequence numbers start at 1")
        if self.last is not None and seq <= self.last:
            return False
        if self.last is not None and seq != self.last + 1:
            raise WireError(f"frame seq {seq} after {self.last}: frames were lost")
        self.last = seq
        return True

    @property
    def ack(self) -> int:
        return self.last or 0
