"""The narrowband link simulator shapes bandwidth and latency, and cuts, blackholes and
restores a link the way the uplink tests need."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from edgetwin.simulators.link import LinkSim


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def roundtrip(port: int, payload: bytes) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    elapsed = time.monotonic() - start
    writer.close()
    return got, elapsed


async def test_bandwidth_and_latency_shape_the_stream(echo: int) -> None:
    payload = bytes(range(256)) * 100  # 25,600 bytes
    async with LinkSim("127.0.0.1", echo, bandwidth_bps=400_000, latency_s=0.1) as link:
        got, elapsed = await roundtrip(link.port, payload)
    assert got == payload  # nothing lost or reordered
    # 25,600 bytes at 400 kbit/s is 0.512 s each way, plus 0.1 s latency each way; the two
    # directions overlap, so at least one serialization plus both latencies.
    assert elapsed >= 0.512 + 0.2 - 0.05
    assert link.bytes_up == len(payload) and link.bytes_down == len(payload)


async def test_loss_costs_retransmission_time_but_no_bytes(echo: int) -> None:
    payload = b"x" * 20 * 1024
    async with LinkSim("127.0.0.1", echo, loss=0.5, rto_s=0.05, seed=1) as link:
        got, elapsed = await roundtrip(link.port, payload)
    assert got == payload
    assert elapsed >= 0.05 * 5  # about half of 40 chunks were "retransmitted", in order


async def test_blackhole_keeps_the_connection_but_drops_everything(echo: int) -> None:
    async with LinkSim("127.0.0.1", echo) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        link.blackhole(True)
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(10), 0.5)
        assert not reader.at_eof()  # half-open: no FIN, no RST
        assert link.up.dropped == 4
        link.restore()
        # Bytes were lost: as with real TCP, that connection cannot go on with a gap.
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(10), 5) == b""
        writer.close()
        got, _ = await roundtrip(link.port, b"again")
        assert got == b"again"


async def test_cut_resets_connections_and_refuses_new_ones_until_restored(echo: int) -> None:
    async with LinkSim("127.0.0.1", echo) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        link.cut()
        assert await asyncio.wait_for(reader.read(10), 5) == b""  # reset
        r2, _w2 = await asyncio.open_connection("127.0.0.1", link.port)
        assert await asyncio.wait_for(r2.read(10), 5) == b""  # refused at once
        link.restore()
        got, _ = await roundtrip(link.port, b"back")
        assert got == b"back"
        assert link.connections == 2


async def test_a_close_does_not_cross_a_blackhole() -> None:
    """One side closing (FIN) or resetting while the link is blackholed: the other side
    hears nothing, as over a cut cable, until the link is restored."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with LinkSim("127.0.0.1", port) as link:
            _, client = await asyncio.open_connection("127.0.0.1", link.port)
            far_reader, far_writer = await asyncio.wait_for(accepted.get(), 5)
            link.blackhole(True)
            client.close()  # the near side gives up and closes
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(far_reader.read(10), 1.0)
            assert not far_reader.at_eof()  # the far side still thinks the stream is open
            link.restore()
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(far_reader.read(10), 5) == b""
            far_writer.close()
    finally:
        server.close()
