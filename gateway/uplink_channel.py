"""The uplink's gRPC call to the relay: one bidirectional ``Sync/Link`` stream over HTTP/2
and mutual TLS, on h2 (a sans-IO HTTP/2 state machine) and asyncio's TLS.

Why not grpcio here: its C core costs a gateway ~25 MB of resident memory (its library's
pages, its threads) for one stream of a few frames a second (docs/measurements.md); the
relay, which serves a thousand streams, keeps it. This is plain gRPC over HTTP/2
(length-prefixed messages, the status in trailers), so any gRPC server serves it, and
only what the link needs: one call per connection, no compression, no HTTP/2 pings (the
link's own heartbeat notices a dead peer, docs/sync-protocol.md). Bounds: a message
from the relay over MAX_MESSAGE_BYTES ends the call; the relay may send at most
WINDOW bytes beyond what the gateway has read (HTTP/2 flow control).
"""

from __future__ import annotations

import asyncio
import collections
import os
import ssl
import struct
import urllib.parse
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from edgetwin.sync.frame import Frame
from edgetwin.sync.wire import MAX_FRAME_BYTES, WireError

LINK_PATH = "/edgetwin.sync.v1.Sync/Link"
MAX_MESSAGE_BYTES = MAX_FRAME_BYTES + 1024  # a Frame: its payload and a few small fields
WINDOW = 2 * MAX_MESSAGE_BYTES
_PREFIX = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length

# gRPC status codes by number, named as grpc's StatusCode names them.
_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


class LinkError(ConnectionError):
    """The call ended: with the relay's gRPC status (``code``, ``details``), or because
    the connection did (``UNAVAILABLE``) or carried what gRPC does not allow."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class TlsSessions(ssl.SSLContext):
    """The client TLS context for the relay. It offers the last connection's session
    again (TLS resumption), so a reconnect sends no certificates over the narrowband link
    (about 2 KB each way)."""

    resume: ssl.SSLSession | None = None
    last: ssl.SSLObject | None = None

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        # asyncio's TLS makes its SSLObject here and has no way to pass a session.
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session or self.resume)
        self.last = obj
        return obj

    def remember(self) -> None:
        """Keep the last connection's session (TLS 1.3 tickets come after the handshake,
        so this is called when a connection ends)."""
        if self.last is not None and (session := self.last.session) is not None:
            self.resume = session
        self.last = None


def tls_context(ca_file: Path, cert_file: Path, key_file: Path) -> TlsSessions:
    """Mutual TLS to the relay: its certificate checked against ``ca_file`` (and its
    name, see :class:`LinkCall`), this gateway's certificate and key presented."""
    ctx = TlsSessions(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=os.fspath(ca_file))
    ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    ctx.set_alpn_protocols(["h2"])  # gRPC servers refuse a connection without it
    return ctx


class LinkCall(asyncio.Protocol):
    """One ``Sync/Link`` call on a connection of its own. :meth:`write` connects on first
    use; :meth:`read` returns the relay's next Frame, or None when it ended the call with
    status OK; either raises :class:`LinkError` once the call has failed. :meth:`close`
    ends it."""

    def __init__(self, address: str, tls: ssl.SSLContext, server_name: str | None, user_agent: str) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.server_name = server_name or self.host
        self.tls = tls
        self.user_agent = user_agent
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False)
        )
        self._transport: asyncio.Transport | None = None
        self._sid = 0
        self._connecting: asyncio.Task[Any] | None = None
        self._connected = asyncio.Event()
        self._inbox = bytearray()
        self._messages: collections.deque[bytes] = collections.deque()
        self._unacked = 0  # flow-controlled bytes received and not yet given back
        self._arrived = asyncio.Event()  # a message, the end, or a failure
        self._writable = asyncio.Event()  # window opened, transport drained, or failure
        self._paused = False
        self._status: tuple[str, str] | None = None  # from trailers (or trailers-only)
        self._ended = False
        self.error: LinkError | None = None

    # ----------------------------------------------------------------- the caller's side
    async def write(self, frame: Frame) -> None:
        await self._connect()
        body = frame.encode()
        view = memoryview(_PREFIX.pack(0, len(body)) + body)
        while view:
            self._check()
            window = min(self._h2.local_flow_control_window(self._sid), self._h2.max_outbound_frame_size)
            if window <= 0 or self._paused:
                self._writable.clear()
                await self._writable.wait()
                continue
            self._h2.send_data(self._sid, view[:window].tobytes())
            view = view[window:]
            self._flush()

    async def read(self) -> Frame | None:
        await self._connected.wait()
        while not self._messages:
            if self.error is not None:
                raise self.error
            if self._ended:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        body = self._messages.popleft()
        # Give back what was read (and, once all is read, padding): the relay can never
        # have more than WINDOW bytes waiting here.
        give = min(self._unacked, len(body) + _PREFIX.size)
        if not self._messages and not self._inbox:
            give = self._unacked
        if give and self.error is None and self._transport is not None:
            self._unacked -= give
            self._h2.acknowledge_received_data(give, self._sid)
            self._flush()
        try:
            return Frame.decode(body)
        except WireError as exc:
            raise WireError(f"a gRPC message from the relay that is not a Frame: {exc}") from None

    def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._transport is not None and not self._transport.is_closing():
            if self.error is None:
                self._h2.close_connection()
                self._flush()
            self._transport.close()
        self._fail(LinkError("CANCELLED", "the gateway ended the call"))

    async def _connect(self) -> None:
        if self._connected.is_set():
            return
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            connect = loop.create_connection(
                lambda: self, self.host, self.port, ssl=self.tls, server_hostname=self.server_name
            )
            self._connecting = loop.create_task(connect)
            # Retrieved here if the awaiting write was cancelled (the watchdog gave up).
            self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            await asyncio.shield(self._connecting)
        except (OSError, ssl.SSLError) as exc:
            self._fail(LinkError("UNAVAILABLE", f"cannot connect to {self.host}:{self.port}: {exc}"))
            raise self.error from None  # type: ignore[misc]

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self._ended:
            raise LinkError(*(self._status or ("UNKNOWN", "the relay ended the call")))

    def _fail(self, error: LinkError) -> None:
        if self.error is None:
            self.error = error
        self._arrived.set()
        self._writable.set()
        self._connected.set()

    def _flush(self) -> None:
        if self._transport is not None and (data := self._h2.data_to_send()):
            self._transport.write(data)

    # ----------------------------------------------------------------- asyncio's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        h = self._h2
        h.initiate_connection()
        h.update_settings(
            {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW, h2.settings.SettingCodes.ENABLE_PUSH: 0}
        )
        h.increment_flow_control_window(WINDOW - h.inbound_flow_control_window)
        self._sid = h.get_next_available_stream_id()
        h.send_headers(
            self._sid,
            [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":path", LINK_PATH.encode()),
                (b":authority", f"{self.server_name}:{self.port}".encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"user-agent", self.user_agent.encode()),
            ],
        )
        self._flush()
        self._connected.set()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._abort(LinkError("INTERNAL", f"HTTP/2 from the relay: {exc}"))
            return
        for event in events:
            self._event(event)
            if self.error is not None:
                return
        self._flush()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            headers = dict(event.headers or ())
            status = headers.get(b":status")
            if status is not None and status != b"200":
                answer = status.decode(errors="replace")
                self._abort(LinkError("UNAVAILABLE", f"the relay answered HTTP {answer}"))
            elif b"grpc-status" in headers:
                code = headers[b"grpc-status"].decode(errors="replace")
                name = _CODES[int(code)] if code.isdigit() and int(code) < len(_CODES) else f"status {code}"
                details = urllib.parse.unquote(headers.get(b"grpc-message", b"").decode(errors="replace"))
                self._status = (name, details or "no details")
        elif isinstance(event, h2.events.DataReceived):
            self._unacked += event.flow_controlled_length or 0
            self._inbox += event.data or b""
            self._split()
        elif isinstance(event, h2.events.StreamEnded):
            self._ended = True
            if self._status is not None and self._status[0] != "OK":
                self._fail(LinkError(*self._status))
            self._arrived.set()
        elif isinstance(event, h2.events.StreamReset):
            self._abort(LinkError("CANCELLED", f"the relay reset the call (HTTP/2 error {event.error_code})"))
        elif isinstance(event, h2.events.ConnectionTerminated):
            why = f"the relay closed the connection (GOAWAY, error {event.error_code})"
            self._abort(LinkError("UNAVAILABLE", why))
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._writable.set()

    def _split(self) -> None:
        inbox = self._inbox
        while len(inbox) >= _PREFIX.size:
            compressed, length = _PREFIX.unpack_from(inbox)
            if compressed:
                self._abort(LinkError("INTERNAL", "a compressed message from the relay (none was offered)"))
                return
            if length > MAX_MESSAGE_BYTES:
                self._abort(
                    LinkError(
                        "RESOURCE_EXHAUSTED",
                        f"a message of {length} bytes from the relay, over the bound of {MAX_MESSAGE_BYTES}",
                    )
                )
                return
            if len(inbox) < _PREFIX.size + length:
                return
            self._messages.append(bytes(inbox[_PREFIX.size : _PREFIX.size + length]))
            del inbox[: _PREFIX.size + length]
            self._arrived.set()

    def _abort(self, error: LinkError) -> None:
        self._fail(error)
        if self._transport is not None:
            self._transport.abort()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(LinkError("UNAVAILABLE", f"connection to the relay lost: {exc or 'closed by the relay'}"))
