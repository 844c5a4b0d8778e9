"""Desired writes leaving the gateway: due writes (by the engine's backoff) go to the
device's in-process mapper, or to external mappers as a delta on MQTT; a device that
cannot be reached pauses its schedule until it can, and the outcome of each attempt
goes back to the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from edgetwin.gateway.mapper_host import MapperSet
from edgetwin.gateway.mqtt import payloads, topics
from edgetwin.gateway.mqtt.bus import MqttBus
from edgetwin.gateway.ops.metrics import Metrics
from edgetwin.gateway.release import Release
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.mappers.sdk import DeviceUnavailable, MapperError
from edgetwin.runtime.aio import wait_within

log = logging.getLogger("edgetwin.gateway.service")


def now_ms() -> int:
    return int(time.time() * 1000)


class WriteLoop:
    """Runs the desired-write schedule. ``mappers()`` and ``bus()`` give what the gateway
    has at the time (both start after the loop's owner is built)."""

    def __init__(
        self,
        engine: TwinEngine,
        release: Release,
        metrics: Metrics,
        mappers: Callable[[], MapperSet | None],
        bus: Callable[[], MqttBus | None],
        spawn: Callable[[Coroutine[Any, Any, None], str], object],
    ) -> None:
        self.engine, self.release, self.metrics = engine, release, metrics
        self._mappers, self._bus, self._spawn = mappers, bus, spawn
        self.woken = asyncio.Event()
        self._writing: set[tuple[str, str]] = set()

    def wake(self) -> None:
        """A desired write may be due: look again."""
        self.woken.set()

    def deliverable(self, dev_id: str) -> bool:
        """Whether a desired write could reach the device now: it is not reported
        offline, and its in-process mapper serves it or the broker is connected (for
        external mappers). Writes to a device that cannot be reached wait, unspent."""
        dev = self.engine.devices.get(dev_id)
        if dev is None or dev.state == "offline":
            return False
        mappers, bus = self._mappers(), self._bus()
        if mappers is not None and dev_id in mappers.by_device:
            return True
        return bus is not None and bus.connected.is_set()

    async def run(self) -> None:
        """Hand due desired writes to the device's mapper, or to external mappers as a
        delta on MQTT, with the engine's backoff between attempts. The schedule of a
        device that cannot be reached is paused (woken when it comes back)."""
        engine = self.engine
        while True:
            due = engine.due_writes(now_ms(), self.deliverable)
            mappers = self._mappers()
            external: dict[str, list[str]] = {}
            for req in due:
                mapper = mappers.by_device.get(req.device_id) if mappers else None
                if mapper is None:
                    external.setdefault(req.device_id, []).append(req.property)
                elif (req.device_id, req.property) not in self._writing:
                    self._spawn(self._mapper_write(req.device_id, req.property, req.value), "write")
                else:  # the previous attempt is still running: this one is not spent
                    engine.write_undelivered(req.device_id, req.property, now_ms())
            for dev_id, props in external.items():
                dev = engine.devices[dev_id]
                body = payloads.delta(now_ms(), dev, engine.deltas(dev_id))
                self.release.deltas.append((dev_id, props, topics.twin_update_delta(dev_id), body))
            if due:
                self.release.changed()
            next_due = engine.next_write_due(self.deliverable)
            timeout = None if next_due is None else max(0.0, (next_due - now_ms()) / 1000)
            self.woken.clear()
            with contextlib.suppress(TimeoutError):
                await wait_within(self.woken.wait(), timeout)

    async def _mapper_write(self, dev_id: str, prop: str, value: Any) -> None:
        mappers = self._mappers()
        assert mappers is not None
        key = (dev_id, prop)
        self._writing.add(key)
        try:
            await self.release.committed()  # the desired value is durable before we act on it
            await mappers.by_device[dev_id].write(mappers.bindings[dev_id], prop, value)
            self.metrics.inc("mapper_writes")
        except DeviceUnavailable as exc:
            # The device could not be reached: not an attempt. Retried once it is back.
            self.metrics.inc("mapper_writes_undelivered")
            self.engine.write_undelivered(dev_id, prop, now_ms(), str(exc) or "device unavailable")
            self.release.changed()
        except Exception as exc:
            # A mapper's own failure (MapperError, I/O) or a bug in a third-party
            # plugin: either way the attempt failed, the reason is kept, retries go on.
            self.metrics.inc("mapper_write_errors")
            if not isinstance(exc, MapperError | OSError | TimeoutError):
                log.error("mapper write raised", extra={"device": dev_id, "property": prop}, exc_info=exc)
            self.engine.write_failed(dev_id, prop, str(exc) or type(exc).__name__)
            self.release.changed()
        finally:
            self._writing.discard(key)
            self.woken.set()
