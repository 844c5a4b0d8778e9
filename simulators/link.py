"""A narrowband link simulator: a TCP proxy with bandwidth, latency, loss, silent drop
and cut/restore controls, for tests and benchmarks of the edge <-> cloud link.

    async with LinkSim("127.0.0.1", relay_port, bandwidth_bps=64_000, latency_s=0.3) as link:
        connect the gateway to link.port ...
        link.blackhole(True)   # half-open: bytes vanish, no FIN, no RST
        link.cut()             # connections reset, new ones refused until restore()

Model, per direction: a chunk of bytes occupies the link for ``len * 8 / bandwidth``
seconds (serialization, in order), then arrives ``latency_s`` later. TCP never loses
bytes, so ``loss`` is modelled as what it costs TCP: a lost segment is delivered after a
retransmission timeout (``rto_s``), holding back what follows. Queues are bounded
(``buffer`` bytes per direction); a full queue stops reading, so the sender's TCP window
closes as on a real slow link. ``bytes_up``/``bytes_down`` count what crossed the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field


@dataclass
class Direction:
    bytes: int = 0
    chunks: int = 0
    dropped: int = 0
    free_at: float = 0.0  # when the link finishes sending what it has


@dataclass(eq=False)
class _Conn:
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    server: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    finished: int = 0  # directions that reached end of stream


class LinkSim:
    """A TCP proxy from ``listen`` to ``target`` that behaves like a narrowband link."""

    CHUNK = 1024  # bytes per scheduling unit (about one satellite/cellular frame)

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        bandwidth_bps: float | None = None,
        latency_s: float = 0.0,
        loss: float = 0.0,
        rto_s: float = 0.2,
        buffer: int = 64 * 1024,
        seed: int | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.bandwidth_bps = bandwidth_bps
        self.latency_s = latency_s
        self.loss = loss
        self.rto_s = rto_s
        self.buffer = buffer
        self.up = Direction()  # client -> target
        self.down = Direction()  # target -> client
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._cut = False
        self._blackhole = False
        self.connections = 0

    @property
    def port(self) -> int:
        return self.listen[1]

    @property
    def bytes_up(self) -> int:
        return self.up.bytes

    @property
    def bytes_down(self) -> int:
        return self.down.bytes

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.listen = (self.listen[0], self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop_all()

    async def __aenter__(self) -> LinkSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- controls -----------------------------------------------------------------

    def cut(self) -> None:
        """The link goes down: open connections are reset, new ones refused."""
        self._cut = True
        for conn in list(self._conns):
            self._close(conn, abort=True)

    def restore(self) -> None:
        """The link is back (after cut() or blackhole()). Connections that lost bytes to
        a blackhole are reset: a real TCP connection either gets its data through or
        dies, it never goes on with a gap in its byte stream."""
        self._cut = False
        if self._blackhole:
            self._blackhole = False
            for conn in list(self._conns):
                self._close(conn, abort=True)

    def blackhole(self, on: bool = True) -> None:
        """Silently drop everything both ways, keeping connections open (half-open)."""
        self._blackhole = on

    # --- the proxy ---------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            _abort(writer)
            return
        try:
            server = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        self.connections += 1
        conn = _Conn((reader, writer), server)
        self._conns.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, reader, server[1], self.up)),
            asyncio.create_task(self._pump(conn, server[0], writer, self.down)),
        ]

    async def _pump(
        self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter, d: Direction
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(max(1, self.buffer // self.CHUNK))
        sender = asyncio.create_task(self._deliver(queue, dst, d))
        try:
            while True:
                data = await src.read(self.CHUNK)
                if not data:
                    if self._blackhole:
                        return  # the FIN is lost like everything else: the far side never hears
                    break
                if self._blackhole:
                    d.dropped += len(data)
                    continue
                now = time.monotonic()
                start = max(now, d.free_at)
                d.free_at = start + (len(data) * 8 / self.bandwidth_bps if self.bandwidth_bps else 0.0)
                due = d.free_at + self.latency_s
                if self.loss and self._random.random() < self.loss:
                    due += self.rto_s
                    d.free_at += self.rto_s  # what follows waits behind the retransmission
                await queue.put((due, data))
            await queue.put(None)
            await sender
            conn.finished += 1
            if conn.finished == 2:  # both sides said goodbye
                self._close(conn, abort=False)
        except (OSError, asyncio.IncompleteReadError):
            if not self._blackhole:  # a reset is lost in a blackhole too
                self._close(conn, abort=True)
        finally:
            sender.cancel()

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes] | None], dst: asyncio.StreamWriter, d: Direction
    ) -> None:
        while True:
            item = await queue.get()
            if item is None:
                with contextlib.suppress(OSError):
                    if dst.can_write_eof():
                        dst.write_eof()
                return
            due, data = item
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._blackhole:
                d.dropped += len(data)
                continue
            d.bytes += len(data)
            d.chunks += 1
            dst.write(data)
            await dst.drain()

    def _close(self, conn: _Conn, abort: bool) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        for task in conn.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for _, w in (conn.client, conn.server):
            if abort:
                _abort(w)
            else:
                w.close()

    async def _drop_all(self) -> None:
        for conn in list(self._conns):
            self._close(conn, abort=True)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (as a dropped link looks to the peer), not a FIN."""
    transport = writer.transport
    with contextlib.suppress(Exception):
        transport.abort()
