"""The edge <-> cloud sync wire format: the batches inside a ``Frame`` of
``protos/edgetwin/sync/v1/sync.proto``, their compression, and the sequence and
acknowledgement bookkeeping of each direction. Pure: no sockets, no gRPC, no clocks.
docs/sync-protocol.md explains it; this module is the one place that defines it.

A batch is a msgpack array of messages, each a map with a type ``t``:

edge -> cloud
    ``hello``   ``{"t": "hello", "proto": 2, "resume": {"Device": rv, "DeviceModel": rv},
                "bps": 8000, "store": "<store id>", "version": "0.2.0", "caps": [...]}``:
                first message of a stream. ``resume``: the last resourceVersion the gateway
                has seen of each kind ("" or absent: none, relist). ``bps``: bytes/s the
                relay may send down. ``store``: the gateway store's id (a new one after a
                store loss). ``caps``: optional messages the gateway understands (today
                ``appliedRevs``); a relay sends none the gateway did not offer.
    ``status``  ``{"t": "status", "dev": "ns.name", "rev": 17, "patch": {...}}``: one
                composed outbox entry (a Device status merge patch; ``twins`` keyed by
                property name) and its outbox revision. An entry too large for one frame
                is sent in parts (``"part": [i, n]``), each a patch of its own. To a relay
                whose welcome names ``statusDeltas``, a device's first message on a stream
                is its whole entry and each later one only what changed since the one
                before; the relay composes a device's messages in order, and ``applied``
                for a revision covers every message of that device before it.
    ``packed``  ``{"t": "packed", "b": <bytes>}``: status messages packed near the
                information floor, to a relay whose welcome names ``packedStatus``:
                device and property names indexed per stream, revisions, timestamps and
                versions as differences, values in their shortest exact form
                (edgetwin/sync/packed.py defines the body). Decoded, they are ``status``
                messages like any other.
    ``stats``   ``{"t": "stats", "s": {"devices": 12, "devicesNotReady": 1, "backlog": 3,
                "oldestMs": 5400}}``: the gateway's health for its Gateway resource: devices
                served and declared-but-not-Ready, outbox entries, and the age (ms, so
                clocks need not agree) of the oldest. With the hello, then when they change.
cloud -> edge
    ``welcome`` ``{"t": "welcome", "proto": 2, "caps": ["statusDeltas"]}``: the relay took
                the hello; the stream is up. ``caps``: what the relay accepts beyond
                protocol 2's base (today ``statusDeltas``, see ``status``); a gateway uses
                none the welcome does not name.
    ``upsert``  ``{"t": "upsert", "kind": "Device", "obj": {...}}``: added or changed.
    ``delete``  ``{"t": "delete", "kind": "Device", "ns": "plant", "name": "x", "rv": "9"}``
    ``synced``  ``{"t": "synced", "kind": "Device", "names": ["ns/name", ...], "rv": "12"}``:
                after a relist, every object that exists now; the gateway drops the others.
    ``rv``      ``{"t": "rv", "kind": "Device", "rv": "20"}``: nothing for this node changed
                up to rv (from watch bookmarks): the resume point moves on.
    ``applied`` ``{"t": "applied", "dev": "ns.name", "rev": 17}``: the API server accepted
                the status of that outbox revision (and ``part``, if it was sent in parts).
    ``appliedRevs`` ``{"t": "appliedRevs", "revs": [17, 1, 1, 3]}``: ``applied`` for many
                whole (not in parts) revisions at once, to a gateway whose hello offered
                ``"caps": ["appliedRevs"]``: the revisions ascending, the first as is and
                each next as its difference from the one before (17, 18, 19, 22 here).
                Outbox revisions come from one counter per gateway, so a revision alone
                names its device; a steady trickle of answers costs a byte or less each.
    ``refused`` ``{"t": "refused", "dev": "ns.name", "rev": 17, "reason": "...", "retry": true}``:
                not written. ``retry: true``: not yet (the Device does not exist yet; the
                gateway keeps the entry and tries again); false: never as things are (another
                node's device).

Frames are numbered per direction from 1 and acknowledged cumulatively: ``ack = n``
means every frame up to n has been applied. Unacknowledged frames are sent again after
a reconnect; a receiver skips a seq it has already applied (re-acknowledging it), so
replays are harmless. Acks ride on data frames; a bare ack frame (no payload) goes only
when none has carried the ack ``ACK_DELAY_S`` after a frame arrived, or ``ACK_EVERY``
frames are waiting for one (:class:`AckTimer`): on a narrowband link a bare frame costs
~50 bytes of TLS, HTTP/2 and gRPC framing. A frame with ``echo`` set asks the peer for an
immediate bare ack frame: the application heartbeat that notices a dead or half-open link.

Payload encodings: 1 plain msgpack; 2 msgpack + zlib per frame; 3 msgpack + raw deflate
with one compression context per stream and direction (frames end in a sync flush, whose
fixed 4-byte tail is left off; a preset dictionary of the protocol's words primes it).
Encoding 3 compresses each frame against the ones before it on the same stream, so a
steady trickle of small status messages costs a few bytes each. Unacknowledged frames
are kept uncompressed and encoded again in the new stream's context when replayed.
"""

from __future__ import annotations

import itertools
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack

PROTOCOL_VERSION = 2

ENCODING_MSGPACK = 1
ENCODING_MSGPACK_ZLIB = 2
ENCODING_MSGPACK_ZSTREAM = 3

# Bounds: a frame's payload on the wire, a batch decompressed (no zip bombs), and the
# messages in one batch. A sender splits work into batches that fit.
MAX_FRAME_BYTES = 1 << 20
MAX_BATCH_BYTES = 8 << 20
MAX_MESSAGES = 10_000

# Stream compression: a 4 KiB window and small state, so a relay holding a thousand
# streams spends about 45 KB per stream on it (a 32 KiB window would cost 300 KB).
_WBITS = 12
_MEM_LEVEL = 5
_SYNC_TAIL = b"\x00\x00\xff\xff"
# Words every stream uses; both ends prime their context with them.
ZDICT = (
    b"resourceVersionmanagedFieldsnodeNamedeviceModelRefprotocolNameconfigDatavisitors"
    b"collectCyclereportCycleDeviceModelDeviceedgetwin.io/v1alpha1apiVersionkindmetadata"
    b"namespacenamespecpropertiesdesiredvaluestatusobservedDesiredorigincloudedgestamp"
    b"writeStatewriteReasonpendingappliedfailedreadErrorreportedtimestampversiontypefloat"
    b"intstringbooleanconditionsDesiredConflictReadyTrueFalselastTransitionTimereason"
    b"messagestateonlineofflineunknownlastOnlineTimetwinspatchrevdevhelloresumewelcome"
    b"upsertdeletesyncedrefusedretrystatspartobservedGenerationedgeStoregeneration"
)

# Acknowledgements (see the module docstring): how long a bare ack waits for a data frame
# to carry it, and how many received frames may wait.
ACK_DELAY_S = 0.5
ACK_EVERY = 4

# Optional messages a gateway offers in its hello's ``caps``.
CAP_APPLIED_REVS = "appliedRevs"
# What a relay accepts, in its welcome's ``caps``: ``statusDeltas``: a device's later
# status messages on a stream may hold only what changed since its previous one (the
# relay composes them, edgetwin.sync.patch), instead of the whole outbox entry.
CAP_STATUS_DELTAS = "statusDeltas"
# ``packedStatus``: status messages may come as one ``packed`` body (edgetwin.sync.packed).
CAP_PACKED_STATUS = "packedStatus"

EDGE_TO_CLOUD = frozenset({"hello", "status", "packed", "stats"})
CLOUD_TO_EDGE = frozenset(
    {"welcome", "upsert", "delete", "synced", "rv", "applied", "appliedRevs", "refused"}
)

_Type = type | tuple[type, ...]
_REQUIRED: dict[str, dict[str, _Type]] = {
    "hello": {"proto": int, "resume": dict},
    "status": {"dev": str, "rev": int, "patch": dict},
    "packed": {"b": bytes},
    "stats": {"s": dict},
    "welcome": {"proto": int},
    "upsert": {"kind": str, "obj": dict},
    "delete": {"kind": str, "ns": str, "name": str, "rv": str},
    "synced": {"kind": str, "names": list, "rv": str},
    "rv": {"kind": str, "rv": str},
    "applied": {"dev": str, "rev": int},
    "appliedRevs": {"revs": list},
    "refused": {"dev": str, "rev": int, "reason": str},
}
_OPTIONAL: dict[str, dict[str, _Type]] = {
    "hello": {"bps": int, "store": str, "version": str, "caps": list},
    "status": {"part": list},
    "welcome": {"relay": str, "caps": list},
    "applied": {"part": int},
    "refused": {"retry": bool, "part": int},
}


class WireError(ValueError):
    """A frame or batch is malformed; the message says what is wrong."""


# --------------------------------------------------------------------------- batches
def pack_batch(messages: list[dict[str, Any]]) -> bytes:
    """A batch as msgpack; raises :class:`WireError` beyond the bounds."""
    if len(messages) > MAX_MESSAGES:
        raise WireError(f"a batch holds at most {MAX_MESSAGES} messages, not {len(messages)}")
    raw: bytes = msgpack.packb(messages, use_bin_type=True)
    if len(raw) > MAX_BATCH_BYTES:
        raise WireError(f"batch of {len(raw)} bytes exceeds {MAX_BATCH_BYTES}")
    return raw


def unpack_batch(raw: bytes, allowed: frozenset[str] | None = None) -> list[dict[str, Any]]:
    """The checked messages of a msgpack batch; raises :class:`WireError`."""
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


def encode_batch(messages: list[dict[str, Any]], compress: bool = True) -> tuple[int, bytes]:
    """(encoding, payload) of a batch compressed on its own (encoding 2, or 1 plain);
    raises :class:`WireError` if it exceeds the frame bound (split the batch)."""
    raw = pack_batch(messages)
    data, encoding = (zlib.compress(raw, 6), ENCODING_MSGPACK_ZLIB) if compress else (raw, ENCODING_MSGPACK)
    if len(data) > MAX_FRAME_BYTES:
        raise WireError(f"frame payload of {len(data)} bytes exceeds {MAX_FRAME_BYTES}; split the batch")
    return encoding, data


def decode_batch(
    encoding: int, payload: bytes, allowed: frozenset[str] | None = None
) -> list[dict[str, Any]]:
    """The messages of a self-contained frame (encoding 1 or 2), checked; raises
    :class:`WireError` naming the problem. Stream frames need a :class:`FrameDecoder`."""
    return unpack_batch(_inflate_frame(encoding, payload), allowed)


def _inflate(inflater: Any, data: bytes) -> bytes:
    try:
        raw: bytes = inflater.decompress(data, MAX_BATCH_BYTES + 1)
    except zlib.error as exc:
        raise WireError(f"payload is not valid deflate data: {exc}") from None
    if len(raw) > MAX_BATCH_BYTES or inflater.unconsumed_tail:
        raise WireError(f"decompressed batch exceeds {MAX_BATCH_BYTES} bytes")
    return raw


def _inflate_frame(encoding: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise WireError(f"frame payload of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    if encoding == ENCODING_MSGPACK:
        return payload
    if encoding == ENCODING_MSGPACK_ZLIB:
        inflater = zlib.decompressobj()
        raw = _inflate(inflater, payload)
        if not inflater.eof:
            raise WireError("payload is truncated zlib data")
        return raw
    if encoding == ENCODING_MSGPACK_ZSTREAM:
        raise WireError("a stream-compressed frame outside a stream")
    raise WireError(f"unknown payload encoding {encoding}")


def check_message(msg: Any, index: int = 0, allowed: frozenset[str] | None = None) -> None:
    if not isinstance(msg, dict):
        raise WireError(f"message {index}: a map, not {type(msg).__name__}")
    kind = msg.get("t")
    if kind not in _REQUIRED:
        raise WireError(f"message {index}: unknown type {kind!r:.40}")
    if allowed is not None and kind not in allowed:
        raise WireError(f"message {index}: {kind!r} is not sent in this direction")
    for key, typ in _REQUIRED[kind].items():
        _check_field(msg, index, kind, key, typ)
    for key, typ in _OPTIONAL.get(kind, {}).items():
        if key in msg:
            _check_field(msg, index, kind, key, typ)
    if kind == "appliedRevs":
        try:
            decode_revs(msg["revs"])
        except WireError as exc:
            raise WireError(f"message {index}: {exc}") from None


def _check_field(msg: dict[str, Any], index: int, kind: str, key: str, typ: _Type) -> None:
    value = msg.get(key)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise WireError(f"message {index} ({kind}): {key} must be {_name(typ)}, got {type(value).__name__}")


def _name(typ: _Type) -> str:
    return typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)


def encode_revs(revs: list[int]) -> list[int]:
    """``appliedRevs``' ``revs`` for a set of revisions: ascending, the first as is, then
    differences (small numbers, a byte each in msgpack, compressing to less)."""
    ordered = sorted(set(revs))
    return [ordered[0], *(b - a for a, b in itertools.pairwise(ordered))] if ordered else []


def decode_revs(revs: list[Any]) -> list[int]:
    """The revisions of ``appliedRevs``' ``revs``; raises :class:`WireError`."""
    out: list[int] = []
    for i, step in enumerate(revs):
        if not isinstance(step, int) or isinstance(step, bool) or step < (0 if i == 0 else 1):
            raise WireError(f"appliedRevs: revs[{i}] must be {'a revision' if i == 0 else 'a step >= 1'}")
        out.append(step if i == 0 else out[-1] + step)
    return out


@dataclass
class AckTimer:
    """When a receiver owes its peer a bare ack frame (pure; the caller passes the clock).
    An ack rides free on any data frame the receiver sends; a bare one is due only after
    :data:`ACK_DELAY_S` without one, or at once when :data:`ACK_EVERY` frames wait."""

    sent: int = 0  # the last ack value sent (on any frame)
    due_at: float | None = None

    def received(self, now: float, delay: float = ACK_DELAY_S) -> None:
        """A frame with a seq arrived (new or a replay: both want an ack), whose ack may
        wait ``delay`` seconds (longer for a frame nothing waits on)."""
        due = now + delay
        self.due_at = due if self.due_at is None else min(self.due_at, due)

    def carried(self, ack: int) -> None:
        """A frame carrying ``ack`` went out."""
        self.sent = ack
        self.due_at = None

    def wait(self, ack: int, now: float) -> float | None:
        """Seconds until a bare ack is due (0: now), or None when none is owed."""
        if self.due_at is None:
            return None
        if ack - self.sent >= ACK_EVERY:
            return 0.0
        return max(0.0, self.due_at - now)


# --------------------------------------------------------------------------- stream codecs
class FrameEncoder:
    """One stream direction's compressor (encoding 3); frames must be sent in the order
    they were encoded."""

    def __init__(self, mem_level: int = _MEM_LEVEL) -> None:
        # (mem_level sizes the match finder, not the window: the decoder needs no change.)
        self._deflater = zlib.compressobj(6, zlib.DEFLATED, -_WBITS, mem_level, zdict=ZDICT)

    def encode(self, raw: bytes) -> tuple[int, bytes]:
        data = self._deflater.compress(raw) + self._deflater.flush(zlib.Z_SYNC_FLUSH)
        if data.endswith(_SYNC_TAIL):
            data = data[: -len(_SYNC_TAIL)]
        if len(data) > MAX_FRAME_BYTES:
            raise WireError(f"frame payload of {len(data)} bytes exceeds {MAX_FRAME_BYTES}; split the batch")
        return ENCODING_MSGPACK_ZSTREAM, data


class FrameDecoder:
    """One stream direction's decompressor: frames of any encoding, in order. A bad
    stream frame leaves the context unusable: the stream must end (the peer reconnects
    and replays on a fresh one)."""

    def __init__(self) -> None:
        self._inflater = zlib.decompressobj(-_WBITS, zdict=ZDICT)

    def decode(
        self, encoding: int, payload: bytes, allowed: frozenset[str] | None = None
    ) -> list[dict[str, Any]]:
        if encoding != ENCODING_MSGPACK_ZSTREAM:
            return unpack_batch(_inflate_frame(encoding, payload), allowed)
        if len(payload) > MAX_FRAME_BYTES:
            raise WireError(f"frame payload of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
        return unpack_batch(_inflate(self._inflater, payload + _SYNC_TAIL), allowed)


# --------------------------------------------------------------------------- sequencing
M = TypeVar("M")


@dataclass
class Outgoing(Generic[M]):
    """One direction's sender side: numbers frames, keeps them (uncompressed) until
    acknowledged, and gives them back to send again after a reconnect. ``meta`` rides
    along with each frame (e.g. which outbox revisions it carries) and comes back on
    acknowledgement. Bounds: ``window`` unacknowledged frames and ``window_bytes`` of
    their batches; :attr:`can_send` is false when either is reached."""

    window: int = 64
    window_bytes: int = 1 << 30
    next_seq: int = 1
    acked: int = 0
    unacked: OrderedDict[int, tuple[bytes, M]] = field(default_factory=OrderedDict)
    unacked_bytes: int = 0

    @property
    def can_send(self) -> bool:
        return len(self.unacked) < self.window and self.unacked_bytes < self.window_bytes

    def send(self, raw: bytes, meta: M) -> int:
        """Number a batch (``pack_batch`` output); returns its seq."""
        if len(self.unacked) >= self.window:
            raise WireError(f"send window of {self.window} frames is full")
        seq = self.next_seq
        self.next_seq += 1
        self.unacked[seq] = (raw, meta)
        self.unacked_bytes += len(raw)
        return seq

    def on_ack(self, ack: int) -> list[M]:
        """The metas of the frames this cumulative ack covers (each once)."""
        if ack >= self.next_seq:
            raise WireError(f"ack {ack} is for a frame never sent (last sent {self.next_seq - 1})")
        done: list[M] = []
        while self.unacked and next(iter(self.unacked)) <= ack:
            _, (raw, meta) = self.unacked.popitem(last=False)
            self.unacked_bytes -= len(raw)
            done.append(meta)
        self.acked = max(self.acked, ack)
        return done

    def replay(self) -> list[tuple[int, bytes]]:
        """(seq, batch) of every unacknowledged frame, in order."""
        return [(seq, raw) for seq, (raw, _) in self.unacked.items()]


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
