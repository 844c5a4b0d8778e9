"""The relay's bound on its own Kubernetes API request rate: a token bucket, as
client-go's ``QPS``/``Burst`` and kubectl's ``--qps``/``--burst``.

Every request the relay's clients make (status reads and writes, Gateway writes, lists,
the start of each watch) takes one token first; with none left it waits. The readiness
probe alone does not (one request per ``apiProbeInterval``): it asks whether the API
server answers, and waiting behind a storm's queue would make a busy replica not ready.
Status for a device that arrives while its write waits is folded into that write
(:mod:`cloud.status_writer`), so a reconnect storm of a thousand gateways slows down to
the configured rate instead of piling up requests, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class ApiRateLimit:
    """At most ``qps`` requests per second on average, ``burst`` at once. ``qps`` 0: no limit."""

    def __init__(self, qps: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if qps < 0 or burst < 1:
            raise ValueError(f"qps must be >= 0 and burst >= 1 (got {qps}, {burst})")
        self.qps, self.burst, self.clock = qps, burst, clock
        self._tokens = float(burst)
        self._at = clock()
        self.waited_s = 0.0  # total time requests waited for a token (a metric)
        self._lock = asyncio.Lock()  # first come, first served

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
        self._at = now

    async def acquire(self) -> float:
        """Wait for a token; returns how long the caller waited (seconds)."""
        if self.qps == 0:
            return 0.0
        async with self._lock:
            self._refill()
            wait = 0.0
            if self._tokens < 1:
                wait = (1 - self._tokens) / self.qps
                await asyncio.sleep(wait)
                self._refill()
            self._tokens -= 1
            self.waited_s += wait
            return wait
