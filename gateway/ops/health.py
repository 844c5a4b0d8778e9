"""Whether the gateway's loops make progress (docs/operations.md, "Health and watchdog").

A loop is *stuck* when it has work pending and has made no progress for ``stuck_after``
seconds: the committer with changes waiting and no commit finished, the MQTT bus with
messages received but not handled or publishes the broker does not acknowledge, the
uplink with frames the relay does not acknowledge. An outage is not a wedge: a broker
or relay that is unreachable is a reconnect loop, which the gateway rides out on its
own (restarting would not help); a connection that stays up while nothing moves is.

Pure logic with an injected clock; the service samples it once a second and serves the
result on ``/healthz`` and to systemd's watchdog (:mod:`gateway.sd_notify`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Loop:
    """One loop to watch: whether it has work pending, and a number that grows whenever
    it gets work done."""

    name: str
    pending: Callable[[], bool]
    progress: Callable[[], int]
    what: str  # what is waiting, for the message: "changes waiting for a commit"
    _last: int | None = field(default=None, repr=False)
    _stalled_since: float | None = field(default=None, repr=False)


class HealthMonitor:
    def __init__(
        self, loops: list[Loop], stuck_after_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.loops, self.stuck_after_s, self.clock = loops, stuck_after_s, clock

    def sample(self) -> None:
        """Look at every loop once (call regularly: once a second)."""
        now = self.clock()
        for loop in self.loops:
            progress = loop.progress()
            if progress != loop._last or not loop.pending():
                loop._stalled_since = None  # moved, or nothing to do
            elif loop._stalled_since is None:
                loop._stalled_since = now
            loop._last = progress

    def problems(self) -> list[str]:
        """One line per stuck loop (empty: healthy)."""
        now = self.clock()
        out = []
        for loop in self.loops:
            since = loop._stalled_since
            if since is not None and now - since >= self.stuck_after_s:
                out.append(f"{loop.name} stuck: {loop.what}, no progress for {now - since:.0f} s")
        return out


__all__ = ["HealthMonitor", "Loop"]
