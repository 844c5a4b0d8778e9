"""Counters of the gateway (rejections by reason, drops, commits), published retained on
``edgetwin/{node}/gateway/metrics`` and logged at shutdown."""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.changed = False

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by
        self.changed = True

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.counters.items()))
