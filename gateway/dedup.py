"""Recognising a twin/update that was already applied, so a redelivery is answered again
but not applied twice (a second application would give the same value a new version).

Pure: no clock, no storage; the service persists :attr:`RecentUpdates.added` with the
commit that applied the updates, so the memory survives a crash between commit and
acknowledgement, which is exactly when the broker redelivers.

A message is a duplicate of an earlier one when both name the same device and the same
non-empty ``event_id`` and their payloads are byte for byte the same (a mapper that
reuses an event_id for new content is not deduplicated), and the earlier one is

* among the newest ``capacity`` updates remembered (at least twice the broker's
  in-flight window, so every update that can be redelivered is there), and
* either the broker marks this delivery a redelivery (MQTT ``DUP`` flag: the gateway's
  own session after a crash or reconnect), or it was applied less than ``window_ms``
  ago (a publisher that resent its message: the broker passes it on as a new one).

The time limit keeps a simple mapper that publishes the same payload with a constant
event_id every minute from being taken for a stream of duplicates.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

# Answers are kept up to this size; a larger one is answered with a short notice.
MAX_ANSWER_BYTES = 1024
DEFAULT_WINDOW_MS = 60_000

Key = tuple[str, str, int]  # device id, event_id, payload digest


def digest(payload: bytes) -> int:
    """A 64-bit digest of a payload (signed, to fit an SQLite INTEGER)."""
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big", signed=True)


@dataclass(slots=True)
class Remembered:
    seq: int
    ts_ms: int
    answer: bytes  # b"" when the answer was too large to keep


@dataclass
class RecentUpdates:
    capacity: int
    window_ms: int = DEFAULT_WINDOW_MS
    entries: OrderedDict[Key, Remembered] = field(default_factory=OrderedDict)
    next_seq: int = 1
    # Rows not yet persisted: (seq, device, event_id, digest, ts_ms, answer).
    added: list[tuple[int, str, str, int, int, bytes]] = field(default_factory=list)

    def key(self, device_id: str, event_id: str, payload: bytes) -> Key | None:
        """The dedup key of a message, or None when it carries no event_id."""
        return (device_id, event_id, digest(payload)) if event_id else None

    def lookup(self, key: Key | None, now_ms: int, redelivered: bool) -> Remembered | None:
        """The earlier application of this message, if it is a duplicate (see the
        module docstring for the rule)."""
        if key is None:
            return None
        seen = self.entries.get(key)
        if seen is None:
            return None
        if redelivered or now_ms - seen.ts_ms < self.window_ms:
            return seen
        return None

    def remember(self, key: Key | None, answer: bytes, now_ms: int) -> None:
        """Note an applied update and its answer (for the next commit to persist)."""
        if key is None:
            return
        kept = answer if len(answer) <= MAX_ANSWER_BYTES else b""
        seq = self.next_seq
        self.next_seq += 1
        self.entries.pop(key, None)
        self.entries[key] = Remembered(seq, now_ms, kept)
        self.added.append((seq, key[0], key[1], key[2], now_ms, kept))
        self._evict()

    def _evict(self) -> None:
        """Keep the updates of the newest ``capacity`` sequence numbers (the same rule
        the store applies to its rows, so a restart restores the same memory)."""
        floor = self.next_seq - self.capacity
        while self.entries and next(iter(self.entries.values())).seq < floor:
            self.entries.popitem(last=False)

    def restore(self, rows: list[tuple[int, str, str, int, int, bytes]]) -> None:
        """Load persisted rows (oldest first) at start."""
        for seq, device_id, event_id, dig, ts_ms, answer in rows:
            key = (device_id, event_id, dig)
            self.entries.pop(key, None)  # the newer row of a key remembered twice wins
            self.entries[key] = Remembered(seq, ts_ms, bytes(answer))
            self.next_seq = max(self.next_seq, seq + 1)
        self._evict()

    def take_added(self) -> tuple[list[tuple[int, str, str, int, int, bytes]], int]:
        """Rows to persist, and the seq below which stored rows may be deleted."""
        rows, self.added = self.added, []
        return rows, self.next_seq - self.capacity

    def forget_device(self, device_id: str) -> None:
        for key in [k for k in self.entries if k[0] == device_id]:
            del self.entries[key]
