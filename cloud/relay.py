"""The cloud relay: one gRPC stream per gateway (``edgetwin.sync.v1.Sync/Link``) over
mutual TLS, between the gateway's outbox and the Kubernetes API.

Per stream, for the node named by the client certificate's common name:

* ``hello`` starts the spec feeds (:class:`cloud.spec_feed.NodeFeed`): the node's Devices
  (by ``spec.nodeName``) and the DeviceModels, each from the gateway's last seen
  resourceVersion;
* each ``status`` goes to the node's :class:`cloud.status_writer.StatusWriter` (its own
  devices only, at most one write per device per ``min_status_interval``); its outcome
  goes back as ``applied`` or ``refused``;
* frames are numbered, acknowledged cumulatively and batched (``deviceapi.wire``).

The relay keeps nothing beyond the stream: a restarted or different replica serves the
next stream the same way, because applying status is idempotent and order-insensitive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from lightkube import AsyncClient
from lightkube.generic_resource import create_namespaced_resource

from cloud.spec_feed import NodeFeed
from cloud.status_writer import Device, Outcome, StatusWriter
from deviceapi.proto.edgetwin.sync.v1 import sync_pb2, sync_pb2_grpc
from deviceapi.types import split_device_id
from deviceapi.wire import (
    EDGE_TO_CLOUD,
    Incoming,
    Outgoing,
    WireError,
    decode_batch,
    encode_batch,
)

log = logging.getLogger(__name__)

DeviceModel = create_namespaced_resource("edgetwin.io", "v1alpha1", "DeviceModel", "devicemodels")

# Keepalive: ping an idle stream every 20 s, give up 10 s after an unanswered ping, so a
# dead or half-open link is noticed within 30 s.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass
class RelaySettings:
    min_status_interval_s: float = 5.0
    batch_max: int = 500  # messages per frame
    flush_s: float = 0.05  # how long to gather messages into one frame
    queue_max: int = 10_000  # messages waiting to go to the gateway; feeds wait when full


class _Session:
    def __init__(self, client: AsyncClient, node: str, settings: RelaySettings) -> None:
        self.client, self.node, self.settings = client, node, settings
        self.out: asyncio.Queue[dict[str, Any]] = asyncio.Queue(settings.queue_max)
        self.outgoing: Outgoing[None] = Outgoing(window=64)
        self.incoming = Incoming()
        self.writer = StatusWriter(client, node, settings.min_status_interval_s)
        self.tasks: list[asyncio.Task[None]] = []
        self.ack_due = asyncio.Event()
        self.window_open = asyncio.Event()
        self.window_open.set()
        self.ended = asyncio.Event()

    async def _feed(self, feed: NodeFeed, resume: str) -> None:
        try:
            async for msg in feed.messages(resume):
                await self.out.put(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the API server failed us: end the stream; the gateway reconnects
            log.warning("spec feed failed", extra={"node": self.node, "error": repr(exc)})
            self.ended.set()

    def _answer(self, dev: str, rev: int, fut: asyncio.Future[Outcome]) -> None:
        if fut.cancelled():
            return
        outcome = fut.result()
        msg: dict[str, Any] = {"t": "applied", "dev": dev, "rev": rev}
        if not outcome.applied:
            msg = {"t": "refused", "dev": dev, "rev": rev, "reason": outcome.reason}
        with contextlib.suppress(asyncio.QueueFull):
            self.out.put_nowait(msg)

    def _handle(self, msg: dict[str, Any]) -> None:
        if msg["t"] == "hello":
            if self.tasks:
                return  # one hello per stream
            resume = msg["resume"]
            feeds = [
                (NodeFeed(self.client, Device, "Device", self.node), str(resume.get("Device", ""))),
                (NodeFeed(self.client, DeviceModel, "DeviceModel", None), str(resume.get("DeviceModel", ""))),
            ]
            for feed, rv in feeds:
                self.tasks.append(asyncio.create_task(self._feed(feed, rv)))
        elif msg["t"] == "status":
            dev, rev = msg["dev"], msg["rev"]
            try:
                namespace, name = split_device_id(dev)
            except ValueError as exc:
                self.out.put_nowait({"t": "refused", "dev": dev, "rev": rev, "reason": str(exc)})
                return
            fut = self.writer.submit(namespace, name, rev, msg["patch"])
            fut.add_done_callback(functools.partial(self._answer, dev, rev))

    async def read(self, frames: AsyncIterator[sync_pb2.Frame]) -> None:
        try:
            async for frame in frames:
                if frame.ack:
                    self.outgoing.on_ack(frame.ack)
                    self.window_open.set()
                if not frame.seq:
                    continue
                if self.incoming.accept(frame.seq):
                    for msg in decode_batch(frame.encoding, frame.payload, EDGE_TO_CLOUD):
                        self._handle(msg)
                self.ack_due.set()
        except WireError as exc:
            log.warning("bad frame from gateway", extra={"node": self.node, "error": str(exc)})
        finally:
            self.ended.set()

    async def frames(self) -> AsyncIterator[sync_pb2.Frame]:
        """Frames to the gateway: batches of queued messages, or a bare ack."""
        while not self.ended.is_set():
            get = asyncio.ensure_future(self.out.get())
            ack = asyncio.ensure_future(self.ack_due.wait())
            end = asyncio.ensure_future(self.ended.wait())
            done, pending = await asyncio.wait({get, ack, end}, return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()
            batch: list[dict[str, Any]] = []
            if get in done:
                batch.append(get.result())
                await asyncio.sleep(self.settings.flush_s)  # let a burst gather
                while len(batch) < self.settings.batch_max and not self.out.empty():
                    batch.append(self.out.get_nowait())
            elif not get.cancelled() and get.done():
                batch.append(get.result())
            if self.ended.is_set() and not batch:
                return
            self.ack_due.clear()
            if not batch:
                yield sync_pb2.Frame(seq=0, ack=self.incoming.ack)
                continue
            while not self.outgoing.can_send:
                self.window_open.clear()
                await self.window_open.wait()
            encoding, payload = encode_batch(batch)
            seq = self.outgoing.send(encoding, payload, None)
            yield sync_pb2.Frame(seq=seq, ack=self.incoming.ack, encoding=encoding, payload=payload)  # type: ignore[arg-type]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.writer.close()


class SyncService(sync_pb2_grpc.SyncServicer):
    def __init__(self, client: AsyncClient, settings: RelaySettings | None = None) -> None:
        self.client = client
        self.settings = settings or RelaySettings()
        self.streams = 0

    async def Link(
        self, request_iterator: AsyncIterator[sync_pb2.Frame], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[sync_pb2.Frame]:
        names = context.auth_context().get("x509_common_name", [])
        if not names:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "a client certificate naming the node is required"
            )
        node = names[0].decode()
        self.streams += 1
        log.info("gateway connected", extra={"node": node})
        session = _Session(self.client, node, self.settings)
        reader = asyncio.create_task(session.read(request_iterator))
        try:
            async for frame in session.frames():
                yield frame
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await session.close()
            log.info("gateway disconnected", extra={"node": node})


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
) -> tuple[grpc.aio.Server, SyncService, int]:
    """Start the relay's gRPC server (mutual TLS) on ``address``; returns the server,
    the service and the bound port."""
    server = grpc.aio.server(options=KEEPALIVE_OPTIONS)
    service = SyncService(client, settings)
    sync_pb2_grpc.add_SyncServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    port = server.add_secure_port(address, creds)
    await server.start()
    return server, service, port
