"""What in-process mappers call (the SDK's :class:`MapperHost`): reports of values, read
errors and states go to the twin engine, and each call returns once the commit that
holds it is durable (a mapper's report is acknowledged like an MQTT message)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgetwin.gateway.ops.metrics import Metrics
from edgetwin.gateway.release import Release
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.twin.model import ReportOutcome, UnknownDevice
from edgetwin.mappers.sdk import MapperError, ReportResult

log = logging.getLogger("edgetwin.gateway.service")

SKIP_WARN_INTERVAL_S = 60.0
SKIP_EVENT_INTERVAL_S = 600.0


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _SkipCount:
    for_log: int = 0
    for_event: int = 0
    logged_at: float = float("-inf")
    evented_at: float = float("-inf")


class MapperSide:
    """The gateway as its in-process mappers see it."""

    def __init__(
        self,
        engine: TwinEngine,
        release: Release,
        metrics: Metrics,
        count_report: Callable[[str, ReportOutcome], None],
        wake_writes: Callable[[], None],
    ) -> None:
        self.engine, self.release, self.metrics = engine, release, metrics
        self._count_report, self._wake_writes = count_report, wake_writes
        self._skipped: dict[str, _SkipCount] = {}

    async def report(
        self, device_id: str, values: Mapping[str, Any], timestamp_ms: int | None = None
    ) -> ReportResult:
        try:
            outcome = self.engine.apply_reported(device_id, values, now_ms(), timestamp_ms)
        except UnknownDevice as exc:
            raise MapperError(str(exc)) from None
        self._count_report(device_id, outcome)
        await self.release.committed()
        return ReportResult({n: r.version for n, r in outcome.accepted.items()}, outcome.rejected)

    async def set_state(self, device_id: str, state: str) -> None:
        self.engine.set_state(device_id, state, now_ms())
        self._wake_writes()  # a device back online resumes its paused writes
        await self.release.committed()

    async def report_errors(self, device_id: str, errors: Mapping[str, str]) -> None:
        self.engine.set_read_errors(device_id, errors, now_ms())
        await self.release.committed()

    def cycles_skipped(self, device_id: str, skipped: int, cycle_ms: int) -> None:
        """A mapper's polling loop overran its collectCycle: count the cycles it skipped
        (metric ``cycles_skipped``), warn at most once a minute per device and note it
        in the event log at most every 10 minutes, each with the count since."""
        self.metrics.inc("cycles_skipped", skipped)
        acc = self._skipped.setdefault(device_id, _SkipCount())
        acc.for_log += skipped
        acc.for_event += skipped
        now = time.monotonic()
        if now - acc.logged_at >= SKIP_WARN_INTERVAL_S:
            log.warning(
                "polling cycles skipped: reads take longer than the collectCycle "
                "(docs/mappers/modbus.md, 'Skipped cycles')",
                extra={"device": device_id, "skipped": acc.for_log, "cycle_ms": cycle_ms},
            )
            acc.for_log, acc.logged_at = 0, now
        if now - acc.evented_at >= SKIP_EVENT_INTERVAL_S and device_id in self.engine.devices:
            detail = {"skipped": acc.for_event, "cycle_ms": cycle_ms}
            self.engine.record_event(now_ms(), device_id, "", "cycles_skipped", detail)
            acc.for_event, acc.evented_at = 0, now
            self.release.changed()
