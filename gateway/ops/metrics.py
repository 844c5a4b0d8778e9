"""Counters of the gateway (rejections by reason, drops, commits) and peak gauges (the
slowest commit since the last report), published retained on
``edgetwin/{node}/gateway/metrics`` and logged at shutdown."""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.peaks: dict[str, float] = {}
        self.changed = False

    def inc(self, name: str, by: int = 1) -> None:
        self.counters[name] += by
        self.changed = True

    def total(self, name: str, value: int) -> None:
        """Mirror a running total kept elsewhere (e.g. the store's dropped events)."""
        if self.counters[name] != value:
            self.counters[name] = value
            self.changed = True

    def peak(self, name: str, value: float) -> None:
        """Keep the largest value seen since the last report."""
        if value > self.peaks.get(name, float("-inf")):
            self.peaks[name] = value

    def snapshot(self, reset_peaks: bool = False) -> dict[str, float]:
        out: dict[str, float] = dict(sorted(self.counters.items()))
        out.update({k: round(v, 2) for k, v in sorted(self.peaks.items())})
        if reset_peaks:
            self.peaks.clear()
        return out
