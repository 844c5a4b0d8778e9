"""The uplink's gRPC call (gateway/uplink_channel.py) against HTTP/2 servers that misbehave
as a broken or hostile relay could, over real mutual TLS. The well-behaved relay (grpcio)
is every test under tests/sync and tests/cloud."""

from __future__ import annotations

import asyncio
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from edgetwin.gateway.uplink import describe
from edgetwin.gateway.uplink_channel import MAX_MESSAGE_BYTES, WINDOW, LinkCall, LinkError, tls_context
from edgetwin.sync.frame import Frame
from edgetwin.sync.v1 import sync_pb2
from edgetwin.sync.wire import WireError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    subprocess.run([str(ROOT / "deploy" / "pki" / "make-test-pki"), str(out), "edge-a"], check=True)
    return out


def grpc_message(body: bytes) -> bytes:
    return struct.pack(">BI", 0, len(body)) + body


def send(conn: h2.connection.H2Connection, sid: int, data: bytes) -> None:
    """DATA frames of at most the peer's frame size (the test relay's windows are ample)."""
    step = conn.max_outbound_frame_size
    for i in range(0, len(data), step):
        conn.send_data(sid, data[i : i + step])


Answer = Callable[[h2.connection.H2Connection, int, bytes | None], None]


class Relay(asyncio.Protocol):
    """An HTTP/2 server whose answer to the Link call is ``answer(conn, stream_id, body)``
    for each whole gRPC message it receives (``body`` None: the request's headers)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.inbox = bytearray()
        self.transport: asyncio.Transport | None = None
        self.received: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        SESSIONS_REUSED.append(transport.get_extra_info("ssl_object").session_reused)
        self.h2.initiate_connection()
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                assert headers[b":path"] == b"/edgetwin.sync.v1.Sync/Link"
                assert headers[b"content-type"] == b"application/grpc"
                self.answer(self.h2, event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated) and event.stream_id:
                self.answer(self.h2, event.stream_id, b"")  # the window opened
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.inbox += event.data
                while len(self.inbox) >= 5:
                    (length,) = struct.unpack(">I", self.inbox[1:5])
                    if len(self.inbox) < 5 + length:
                        break
                    body = bytes(self.inbox[5 : 5 + length])
                    del self.inbox[: 5 + length]
                    self.received.append(body)
                    self.answer(self.h2, event.stream_id, body)
        assert self.transport is not None
        self.transport.write(self.h2.data_to_send())


SESSIONS_REUSED: list[bool] = []
OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


async def serve(pki: Path, answer: Answer) -> asyncio.Server:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(pki / "relay.pem"), str(pki / "relay-key.pem"))
    ctx.set_alpn_protocols(["h2"])
    return await asyncio.get_running_loop().create_server(lambda: Relay(answer), "127.0.0.1", 0, ssl=ctx)


@pytest.fixture
async def link(pki: Path) -> AsyncIterator[Callable[..., LinkCall]]:
    tls = tls_context(pki / "ca.pem", pki / "edge-a.pem", pki / "edge-a-key.pem")
    calls: list[LinkCall] = []

    def make(server: asyncio.Server) -> LinkCall:
        port = server.sockets[0].getsockname()[1]
        call = LinkCall(f"127.0.0.1:{port}", tls, "localhost", "edgetwin/test")
        calls.append(call)
        return call

    yield make
    for call in calls:
        call.close()


def frame(seq: int, payload: bytes = b"") -> Frame:
    return Frame(seq=seq, ack=seq, encoding=sync_pb2.ENCODING_MSGPACK, payload=payload)


async def first_answer(call: LinkCall) -> Frame | None:
    """Send a frame and read the answer: a failure may surface in either (an answer
    can arrive before the write is done)."""
    await call.write(frame(1))
    return await asyncio.wait_for(call.read(), 10)


async def test_frames_cross_both_ways_and_the_relays_ok_ends_the_call_and_tls_resumes(
    pki: Path, link: Callable[[asyncio.Server], LinkCall]
) -> None:
    def echo(conn: h2.connection.H2Connection, sid: int, body: bytes | None) -> None:
        if body is None:
            conn.send_headers(sid, OK_HEADERS)
        if not body:  # the call's start, or a window update
            return
        send(conn, sid, grpc_message(body))
        if sync_pb2.Frame.FromString(body).seq == 3:
            conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)

    server = await serve(pki, echo)
    SESSIONS_REUSED.clear()
    for _ in range(2):  # the second connection resumes the first one's TLS session
        call = link(server)
        big = bytes(range(256)) * 2000  # 512 KB: more than a connection's first window
        sent = [frame(1, b"hello"), frame(2, big), frame(3)]
        for f in sent:
            await call.write(f)
        got = [await asyncio.wait_for(call.read(), 10) for _ in sent]
        assert got == sent
        assert await asyncio.wait_for(call.read(), 10) is None  # status OK: the end
        call.close()
        call.tls.remember()  # type: ignore[attr-defined]
    assert SESSIONS_REUSED == [False, True]
    server.close()


async def test_a_message_over_the_bound_ends_the_call_naming_the_bound(
    pki: Path, link: Callable[[asyncio.Server], LinkCall]
) -> None:
    def huge(conn: h2.connection.H2Connection, sid: int, body: bytes | None) -> None:
        if body is None:
            conn.send_headers(sid, OK_HEADERS)
            # A prefix claiming 1 GB, then data: buffering it would take the gateway's memory.
            send(conn, sid, struct.pack(">BI", 0, 1 << 30) + b"x" * 16000)

    server = await serve(pki, huge)
    call = link(server)
    with pytest.raises(LinkError) as err:
        await first_answer(call)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    assert str(1 << 30) in err.value.details and str(MAX_MESSAGE_BYTES) in err.value.details
    with pytest.raises(LinkError):
        await call.write(frame(2))  # the call stays failed
    server.close()


async def test_a_refusal_in_trailers_only_names_the_relays_code_and_words(
    pki: Path, link: Callable[[asyncio.Server], LinkCall]
) -> None:
    def refuse(conn: h2.connection.H2Connection, sid: int, body: bytes | None) -> None:
        if body is None:
            conn.send_headers(
                sid,
                [
                    *OK_HEADERS,
                    (b"grpc-status", b"9"),
                    (b"grpc-message", b"wire%20protocol%203%20is%20not%202%3A%20upgrade%20the%20relay"),
                ],
                end_stream=True,
            )

    server = await serve(pki, refuse)
    call = link(server)
    with pytest.raises(LinkError) as err:
        await first_answer(call)
    assert describe(err.value) == "FAILED_PRECONDITION: wire protocol 3 is not 2: upgrade the relay"
    server.close()


async def test_a_message_that_is_not_a_frame_is_a_wire_error_and_garbage_http2_ends_the_call(
    pki: Path, link: Callable[[asyncio.Server], LinkCall]
) -> None:
    def junk(conn: h2.connection.H2Connection, sid: int, body: bytes | None) -> None:
        if body is None:
            conn.send_headers(sid, OK_HEADERS)
            send(conn, sid, grpc_message(b"\xff\xff\xff\xff"))  # not protobuf

    server = await serve(pki, junk)
    call = link(server)
    with pytest.raises(WireError, match="not a Frame"):
        await first_answer(call)
    server.close()

    # A peer that speaks TLS but not HTTP/2.
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "relay.pem"), str(pki / "relay-key.pem"))
    ctx.set_alpn_protocols(["h2"])

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" * 3 + b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        await reader.read(1 << 16)

    bad = await asyncio.start_server(garbage, "127.0.0.1", 0, ssl=ctx)
    call = link(bad)
    with pytest.raises(LinkError) as err:
        await first_answer(call)
    assert err.value.code in ("INTERNAL", "UNAVAILABLE")
    bad.close()


async def test_the_relay_can_have_at_most_a_window_unread(
    pki: Path, link: Callable[[asyncio.Server], LinkCall]
) -> None:
    relay: list[h2.connection.H2Connection] = []

    def flood(conn: h2.connection.H2Connection, sid: int, body: bytes | None) -> None:
        if body is None:
            relay.append(conn)
            conn.send_headers(sid, OK_HEADERS)
        if body is None or body == b"":  # the call's start, or its window opened: fill it
            chunk = grpc_message(sync_pb2.Frame(seq=1, payload=b"y" * 60000).SerializeToString())
            while conn.local_flow_control_window(sid) >= len(chunk):
                send(conn, sid, chunk)

    server = await serve(pki, flood)
    call = link(server)
    await call.write(frame(1))
    await asyncio.sleep(0.5)  # the flood arrives; nothing is read
    sent_before = relay[0].local_flow_control_window(1)
    assert sent_before < len(grpc_message(b"y" * 60010))  # the window is spent...
    assert WINDOW - 70000 <= sum(len(m) for m in call._messages) <= WINDOW  # ...and held, no more
    first = await asyncio.wait_for(call.read(), 10)
    assert first is not None and first.payload == b"y" * 60000
    server.close()
