"""The relay as a service: its Kubernetes clients, rate limit, API probe, gRPC server
and health and metrics endpoints, assembled from a :class:`RelayConfig` and run until
cancelled (``edgetwin cloud run``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from edgetwin.cloud import ops
from edgetwin.cloud.api_rate import ApiRateLimit
from edgetwin.cloud.config import RelayConfig
from edgetwin.cloud.gateway_status import GatewayTiming
from edgetwin.cloud.relay import serve
from edgetwin.cloud.session import RelaySettings
from edgetwin.runtime.aio import cancel_tasks
from edgetwin.runtime.ops_http import OpsServer, split_listen


class RelayStartError(Exception):
    """The relay cannot serve as configured (an address that cannot be bound); the
    message names the config key."""


def relay_settings(cfg: RelayConfig) -> RelaySettings:
    """The gRPC service's settings from the config (durations are in milliseconds there)."""
    gateway = cfg.gatewayStatus
    return RelaySettings(
        min_status_interval_s=cfg.minStatusInterval / 1000,
        node_selector=cfg.nodeSelector,
        dead_after_s=cfg.linkDeadAfter / 1000,
        name=cfg.name or "",
        gateway=GatewayTiming(
            interval_s=gateway.interval / 1000,
            heartbeat_s=gateway.heartbeat / 1000,
            stale_after_s=gateway.staleAfter / 1000,
        ),
    )


async def run_relay(cfg: RelayConfig, kube: Any) -> None:
    """Serve gateways until cancelled; prints one line saying where it listens."""
    client = ops.api_client(kube, "edgetwin-relay")
    watch_client = ops.api_client(kube, "edgetwin-relay", watches=True)
    limit = ApiRateLimit(cfg.apiQPS, cfg.apiBurst)  # one rate for both clients
    ops.instrument(client, limit)
    ops.instrument(watch_client, limit)
    # The probe asks whether the API server answers, not whether the bucket has a
    # token: behind a reconnect storm's queue it would time out and take a busy but
    # healthy replica out of its Service. One request per interval, unthrottled.
    probe_client = ops.api_client(kube, "edgetwin-relay", connections=1)
    ops.instrument(probe_client)
    health = await ops.new_health()
    probe = ops.ApiProbe(probe_client, health, cfg.apiProbeInterval / 1000)
    probe_task = asyncio.create_task(probe.run(), name="api probe")
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(client.close)
        stack.push_async_callback(watch_client.close)
        stack.push_async_callback(probe_client.close)
        stack.push_async_callback(cancel_tasks, [probe_task])
        try:
            server, _, port = await serve(
                client,
                cfg.listen,
                cfg.tls.cert_file.read_bytes(),
                cfg.tls.key_file.read_bytes(),
                cfg.tls.ca_file.read_bytes(),
                relay_settings(cfg),
                health,
                watch_client,
            )
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            raise RelayStartError(f"listen: cannot serve on {cfg.listen}: {exc}") from None
        stack.push_async_callback(server.stop, 5)
        lines = [f"edgetwin relay listening on {cfg.listen.rsplit(':', 1)[0]}:{port} (mutual TLS)"]
        if cfg.healthListen:
            try:
                hserver, hport = await ops.health_server(health, cfg.healthListen)
            except RuntimeError as exc:
                raise RelayStartError(f"healthListen: cannot serve on {cfg.healthListen}: {exc}") from None
            stack.push_async_callback(hserver.stop, 1)
            lines.append(f"grpc health on {cfg.healthListen.rsplit(':', 1)[0]}:{hport}")
        if cfg.metricsListen:
            web = OpsServer(probe.problems)
            try:
                mport = await web.start(*split_listen(cfg.metricsListen))
            except OSError as exc:
                raise RelayStartError(f"metricsListen: cannot serve on {cfg.metricsListen}: {exc}") from None
            stack.push_async_callback(web.stop)
            lines.append(f"metrics on http://{cfg.metricsListen.rsplit(':', 1)[0]}:{mport}/metrics")
        print("; ".join(lines), flush=True)
        await server.wait_for_termination()
