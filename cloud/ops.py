"""The relay's probes and metrics (docs/operations.md, "Relay probes and metrics").

Readiness is whether the relay can reach the Kubernetes API: a replica that cannot
must not take gateways, whose status it could not write. It is served with the standard
gRPC health-checking protocol (``grpc.health.v1``) on the sync port (mutual TLS) and on
a plaintext probe port for kubelet's ``grpc:`` probes, and as ``/healthz`` beside
``/metrics``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from lightkube import AsyncClient
from prometheus_client import Counter, Gauge, Histogram

from edgetwin.cloud.api_rate import ApiRateLimit
from edgetwin.runtime.aio import wait_within

log = logging.getLogger(__name__)

# The service name gateways' probes and kubelet may ask for; "" is the whole server.
SYNC_SERVICE = "edgetwin.sync.v1.Sync"

STREAMS = Gauge("edgetwin_relay_streams", "Gateway streams open on this replica")
NODE_STREAMS = Gauge(
    "edgetwin_relay_node_streams",
    "Streams open per node (a series exists only while the node is connected)",
    ["node"],
)
STREAM_OPENS = Counter("edgetwin_relay_stream_opens_total", "Gateway streams opened")
STREAM_ENDS = Counter("edgetwin_relay_stream_ends_total", "Gateway streams ended, by reason", ["reason"])
FRAMES = Counter("edgetwin_relay_frames_total", "Sync frames with a payload", ["direction"])
PAYLOAD_BYTES = Counter("edgetwin_relay_payload_bytes_total", "Sync frame payload bytes", ["direction"])
API_REQUESTS = Counter("edgetwin_relay_api_requests_total", "Kubernetes API requests", ["verb", "code"])
API_SECONDS = Histogram(
    "edgetwin_relay_api_request_seconds",
    "Kubernetes API request latency (to the response headers)",
    ["verb"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_THROTTLED = Counter(
    "edgetwin_relay_api_throttled_seconds",
    "Time API requests waited for the relay's own rate limit (apiQPS, apiBurst)",
)
API_REACHABLE = Gauge("edgetwin_relay_api_reachable", "1 while the Kubernetes API answers the probe")
STATUS_MESSAGES = Counter("edgetwin_relay_status_messages_total", "Status messages received from gateways")
STATUS_WRITES = Counter("edgetwin_relay_status_writes_total", "Device status writes to the API")
STATUS_FOLDED = Counter(
    "edgetwin_relay_status_messages_folded_total",
    "Status messages folded into another's write (minStatusInterval at work)",
)


# The relay's request pool: status reads and writes, Gateway writes, lists, probes. Small
# on purpose: httpcore checks every pooled connection (two system calls each) for every
# request it sends, so a large pool costs CPU on each request; 16 connections of HTTP/1.1
# carry several hundred requests/s at an API server's usual latency, above apiQPS.
API_REQUEST_CONNECTIONS = 16


def _adapter(client: AsyncClient, what: str) -> Any:
    """lightkube's adapter inside ``client``, whose ``_client`` is the httpx client it
    sends with (a private layout: checked, so a lightkube that changes it fails loudly)."""
    adapter = getattr(client, "_client", None)
    if not isinstance(getattr(adapter, "_client", None), httpx.AsyncClient):
        raise RuntimeError(f"cannot {what} (an unknown lightkube layout)")
    return adapter


def api_client(
    kube: Any, field_manager: str, watches: bool = False, connections: int = API_REQUEST_CONNECTIONS
) -> AsyncClient:
    """A Kubernetes client (lightkube) for the kubeconfig context ``kube``: for requests
    (a pool of ``connections``; more wait for a free one), or with ``watches`` for the
    feeds' watches (a pool without a fixed size).

    Every connected gateway holds two watches (its Devices, the DeviceModels), a
    connection each over HTTP/1.1, for as long as it is connected: they get a client of
    their own, bounded by connected gateways x 2. With httpx's default pool of 100 shared
    by both, the first 50 gateways' watches took every connection and each status write
    failed for want of one (PoolTimeout); with one large shared pool every request paid
    for a scan of all the watches' connections (httpcore assigns requests by walking its
    pool), and a relay with 200 gateways spent its core on that (scripts/bench/fleet.py)."""
    from lightkube.config.client_adapter import ConnectionParams

    client = AsyncClient(config=kube, field_manager=field_manager)
    adapter = _adapter(client, "size the Kubernetes client's pool")
    # lightkube's own connection settings (server, TLS, auth, timeout), with the pool
    # sized as above; lightkube takes no limits of its own.
    params = ConnectionParams().httpx_params(kube)
    params.pop("transport", None)
    limits = httpx.Limits(
        max_connections=None if watches else connections,
        max_keepalive_connections=None if watches else connections,
    )
    adapter._client = httpx.AsyncClient(**params, limits=limits)
    return client


def instrument(client: AsyncClient, limit: ApiRateLimit | None = None) -> None:
    """Count and time every API request the client makes, and hold each to ``limit``
    (httpx event hooks on the client lightkube wraps; a request hook is awaited before
    the request is sent)."""
    http: httpx.AsyncClient = _adapter(client, "instrument the Kubernetes client")._client

    async def on_request(request: httpx.Request) -> None:
        if limit is not None:
            waited = await limit.acquire()
            if waited:
                API_THROTTLED.inc(waited)
        request.extensions["edgetwin_started"] = time.perf_counter()

    async def on_response(response: httpx.Response) -> None:
        request = response.request
        verb = request.method
        if verb == "GET" and request.url.params.get("watch") in ("1", "true"):
            verb = "WATCH"
        API_REQUESTS.labels(verb, str(response.status_code)).inc()
        started = request.extensions.get("edgetwin_started")
        if isinstance(started, float):
            API_SECONDS.labels(verb).observe(time.perf_counter() - started)

    hooks = http.event_hooks
    hooks["request"].append(on_request)
    hooks["response"].append(on_response)
    http.event_hooks = hooks


class ApiProbe:
    """Asks the API server a cheap question every ``interval_s`` (a GET of a Gateway
    that does not exist: any HTTP answer but 401/403/5xx means reachable and allowed)
    and sets the health service's status from the answer."""

    PROBE_NAME = "edgetwin-readiness-probe"

    def __init__(
        self, client: AsyncClient, health: health_aio.HealthServicer, interval_s: float = 10.0
    ) -> None:
        self.client, self.health, self.interval_s = client, health, interval_s
        self.reachable: bool | None = None
        self.last_error = ""

    async def check(self) -> bool:
        from edgetwin.cloud.gateway_status import Gateway

        try:
            await wait_within(self.client.get(Gateway, self.PROBE_NAME), self.interval_s)
            ok, why = True, ""
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            ok = code == 404
            why = "" if ok else f"the API server answered {code}"
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            ok, why = False, f"cannot reach the API server: {type(exc).__name__}: {exc}"
        except Exception as exc:  # anything else the client raises: not ready, say why
            ok, why = False, f"API probe failed: {type(exc).__name__}: {exc}"
        if ok != self.reachable:
            if ok:
                log.info("kubernetes API reachable; ready")
            else:
                log.warning("kubernetes API unreachable; not ready", extra={"error": why})
        self.reachable, self.last_error = ok, why
        API_REACHABLE.set(1 if ok else 0)
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SYNC_SERVICE, status)
        return ok

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    def problems(self) -> list[str]:
        if self.reachable is None:
            return ["the Kubernetes API has not been probed yet"]
        return [] if self.reachable else [self.last_error]


async def health_server(health: health_aio.HealthServicer, address: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext gRPC server carrying only the health service, for kubelet's grpc
    probes (they cannot present the client certificate the sync port requires)."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def new_health() -> health_aio.HealthServicer:
    """A health service that says NOT_SERVING until the first probe answers."""
    health = health_aio.HealthServicer()
    for service in ("", SYNC_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    return health


__all__ = [
    "SYNC_SERVICE",
    "ApiProbe",
    "api_client",
    "health_server",
    "instrument",
    "new_health",
]
