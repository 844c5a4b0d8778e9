"""The cloud relay: one gRPC stream per gateway (``edgetwin.sync.v1.Sync/Link``) over
mutual TLS, between the gateway's outbox and the Kubernetes API.

Per stream, for the node named by the client certificate's common name:

* ``hello`` is answered with ``welcome`` and starts the spec feeds
  (:class:`cloud.spec_feed.NodeFeed`): the node's Devices and the DeviceModels, each from
  the gateway's last seen resourceVersion;
* each ``status`` goes to the node's :class:`cloud.status_writer.StatusWriter` (its own
  devices only, at most one write per device per ``min_status_interval``); its outcome
  goes back as ``applied`` or ``refused``;
* frames are numbered, acknowledged cumulatively, compressed in one context per stream
  and batched (``deviceapi.wire``), and paced at the bytes/s the gateway's hello allows,
  each frame holding at most a couple of seconds of it, so the gateway's heartbeats are
  never queued behind minutes of data;
* a frame asking for an echo is answered at once with a bare ack; a stream the gateway
  has sent nothing on for ``dead_after_s`` is taken as dead and closed;
* the node's ``Gateway`` resource follows the stream and the gateway's ``stats``
  (:mod:`cloud.gateway_status`).

The relay keeps nothing beyond the stream: a restarted or different replica serves the
next stream the same way, because applying status is idempotent and order-insensitive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from lightkube import AsyncClient

from edgetwin.cloud import ops
from edgetwin.cloud.gateway_status import GatewayReporter
from edgetwin.cloud.ops import API_REQUEST_CONNECTIONS
from edgetwin.cloud.session import RelaySettings, Session, StreamEnded
from edgetwin.cloud.status_writer import WriteSlots
from edgetwin.sync.v1 import sync_pb2_grpc
from edgetwin.sync.wire import (
    MAX_FRAME_BYTES,
)

log = logging.getLogger(__name__)


# HTTP/2 options for both ends: no BDP probe pings (each costs bytes on a narrowband
# link, and a 64 KiB flow-control window is plenty for it). Dead links are noticed by
# the application heartbeat (Frame.echo), not by HTTP/2 keepalive pings.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES + 1024),
    ("grpc.max_send_message_length", MAX_FRAME_BYTES + 1024),
]


class SyncService(sync_pb2_grpc.SyncServicer):
    def __init__(
        self,
        client: AsyncClient,
        settings: RelaySettings | None = None,
        on_stream: Callable[[str, bool], None] | None = None,
        watch_client: AsyncClient | None = None,
    ) -> None:
        self.client = client
        # The feeds' watches on a client of their own (cloud.ops.api_client): a pool
        # holding every watch's connection makes each request on it scan them all.
        self.watch_client = watch_client or client
        # Status requests in flight for all streams together: at most the request pool.
        self.requests = WriteSlots(API_REQUEST_CONNECTIONS)
        self.settings = settings or RelaySettings()
        self.streams = 0
        self.active: dict[str, int] = {}  # node -> open streams
        self.on_stream = on_stream
        name = self.settings.name or os.environ.get("POD_NAME") or socket.gethostname()
        self.reporter = GatewayReporter(client, name, self.settings.gateway)
        self.background: asyncio.Task[None] | None = None

    async def Link(self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        names = context.auth_context().get("x509_common_name", [])
        if not names:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "a client certificate naming the node is required"
            )
        node = names[0].decode()
        self.streams += 1
        self.active[node] = self.active.get(node, 0) + 1
        ops.STREAM_OPENS.inc()
        ops.STREAMS.inc()
        ops.NODE_STREAMS.labels(node).set(self.active[node])
        session = Session(
            self.client, node, self.settings, context, self.reporter, self.watch_client, self.requests
        )
        log.info("gateway connected", extra={"node": node, "peer": context.peer()})
        tasks = [
            asyncio.create_task(session.read(), name=f"read {node}"),
            asyncio.create_task(session.write(), name=f"write {node}"),
            asyncio.create_task(session.watchdog(), name=f"watchdog {node}"),
        ]
        why = "closed"
        try:
            while True:
                done, _ = await asyncio.wait(tasks, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                failed = session.feeds_failed()
                if done or failed is not None:
                    error = failed or next(iter(done)).exception()
                    why = _reason(error)
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()
            self.active[node] -= 1
            ops.STREAMS.dec()
            ops.STREAM_ENDS.labels(_condition(why)[0]).inc()
            if self.active[node]:
                ops.NODE_STREAMS.labels(node).set(self.active[node])
            else:
                del self.active[node]
                ops.NODE_STREAMS.remove(node)  # series only for connected nodes
            if session.hello is not None:
                self.reporter.disconnected(node, *_condition(why))
            log.info("gateway disconnected", extra={"node": node, "reason": why})
        if isinstance(why, str) and why.startswith("protocol:"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, why.removeprefix("protocol: "))


def _condition(why: str) -> tuple[str, str]:
    """The Gateway's Connected=False reason for how a stream ended."""
    if "the link is dead" in why:
        return "LinkDead", why
    if why in ("closed", "the gateway closed the stream"):
        return "Closed", why
    if why.startswith("protocol:"):
        return "ProtocolMismatch", why.removeprefix("protocol: ")
    return "StreamLost", why


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "closed"
    if isinstance(error, StreamEnded) and "sync protocol" in str(error):
        return f"protocol: {error}"
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


def read_pki(directory: Path) -> tuple[bytes, bytes, bytes]:
    """The relay's certificate, key and client CA from a folder laid out as
    ``deploy/pki/make-test-pki`` writes it (relay.pem, relay-key.pem, ca.pem)."""
    cert, key, ca = ((directory / n).read_bytes() for n in ("relay.pem", "relay-key.pem", "ca.pem"))
    return cert, key, ca


async def serve(
    client: AsyncClient,
    address: str,
    cert: bytes,
    key: bytes,
    ca: bytes,
    settings: RelaySettings | None = None,
    health: health_aio.HealthServicer | None = None,
    watch_client: AsyncClient | None = None,
) -> tuple[grpc.aio.Server, SyncService, int]:
    """Start the relay's gRPC server (mutual TLS) on ``address``; returns the server,
    the service and the bound port. ``health`` (grpc.health.v1) is served beside the
    sync service when given; ``watch_client`` carries the feeds' watches (default
    ``client``)."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    service = SyncService(client, settings, watch_client=watch_client)
    sync_pb2_grpc.add_SyncServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    if health is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    port = server.add_secure_port(address, creds)  # RuntimeError when it cannot bind
    if port == 0 and not address.endswith(":0"):
        raise RuntimeError(f"cannot bind {address}")
    await server.start()
    service.background = asyncio.create_task(_report_while_serving(server, service))
    return server, service, port


async def _report_while_serving(server: grpc.aio.Server, service: SyncService) -> None:
    """The Gateway reporter lives as long as the server."""
    reporter = asyncio.create_task(service.reporter.run(), name="gateway status")
    try:
        await server.wait_for_termination()
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)


__all__ = ["CHANNEL_OPTIONS", "SyncService", "read_pki", "serve"]
