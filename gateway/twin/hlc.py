"""Hybrid logical clock stamps for desired-value writes.

A stamp is (wall milliseconds, counter). It never goes backwards on one host, even when
the wall clock does, and it moves past every stamp it has seen from elsewhere, so "the
later write" is well defined across the edge and the cloud (last writer wins).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_STAMP = re.compile(r"^(\d{1,15})\.(\d{1,9})$")


@dataclass(frozen=True, order=True, slots=True)
class Stamp:
    wall_ms: int
    counter: int = 0

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}"

    @classmethod
    def parse(cls, text: str) -> Stamp:
        """Parse ``"<wall_ms>.<counter>"``; raises ``ValueError`` naming the bad text."""
        match = _STAMP.match(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not an HLC stamp of the form <wall_ms>.<counter>")
        return cls(int(match.group(1)), int(match.group(2)))


ZERO = Stamp(0, 0)


class HybridClock:
    """The clock state; the caller supplies wall time and persists :attr:`last`."""

    def __init__(self, last: Stamp = ZERO) -> None:
        self.last = last

    def now(self, wall_ms: int) -> Stamp:
        """A fresh stamp for a local write, strictly after every stamp issued or seen."""
        if wall_ms > self.last.wall_ms:
            self.last = Stamp(wall_ms, 0)
        else:
            self.last = Stamp(self.last.wall_ms, self.last.counter + 1)
        return self.last

    def observe(self, remote: Stamp) -> None:
        """Take note of a stamp from elsewhere so later local stamps sort after it."""
        if remote > self.last:
            self.last = remote
