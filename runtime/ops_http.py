"""The small HTTP endpoint the gateway and the relay both serve for operators:
``/metrics`` (Prometheus text format) and ``/healthz`` (200 or 503 with the reasons as
JSON). Served by aiohttp on the service's own event loop, so a wedged loop also fails
the probe."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

# What a health check returns: the problems found (empty: healthy).
HealthCheck = Callable[[], list[str]]


class OpsServer:
    """``/metrics`` and ``/healthz`` on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, health: HealthCheck, registry: CollectorRegistry = REGISTRY) -> None:
        self.health, self.registry = health, registry
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # aiohttp exposes the bound sockets only here
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        problems = self.health()
        doc = {"status": "ok" if not problems else "failing", "problems": problems}
        return web.Response(
            text=json.dumps(doc) + "\n", status=200 if not problems else 503, content_type="application/json"
        )


def split_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:9464`` for IPv6) as a host and a port."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


__all__ = ["HealthCheck", "OpsServer", "split_listen"]
