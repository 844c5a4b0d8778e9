"""Rate limits for log lines, shared by the gateway and the relay: a noisy source (a
mapper publishing garbage, a gateway reconnecting in a loop) cannot flood the journal."""

from __future__ import annotations

import time


class RateLimit:
    """Allows ``burst`` events per key every ``per_s`` seconds, counting the rest."""

    def __init__(self, burst: int = 10, per_s: float = 60.0) -> None:
        self.burst, self.per_s = burst, per_s
        self._windows: dict[str, tuple[float, int]] = {}
        self.suppressed = 0

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.per_s:
            start, count = now, 0
        self._windows[key] = (start, count + 1)
        if count < self.burst:
            return True
        self.suppressed += 1
        return False
