"""The emulator on a loopback port, with etcd-like compaction on a timer and a
kubeconfig for kubectl and lightkube."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml
from aiohttp import web

from edgetwin.simulators.kube.emulator import Emulator


class RunningEmulator:
    """An emulator listening on host:port (``async with``)."""

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator, self.host, self.port = emulator, host, port
        self._runner: web.AppRunner | None = None
        self._compactor: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self.emulator.compact_s:
            self._compactor = asyncio.create_task(self._compact_every(self.emulator.compact_s))
        self._runner = web.AppRunner(self.emulator.app(), access_log=None)
        await self._runner.setup()
        # A relay with a thousand gateways opens two thousand watches at once.
        site = web.TCPSite(self._runner, self.host, self.port, backlog=4096)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _compact_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.emulator.compact()

    async def stop(self) -> None:
        if self._compactor is not None:
            self._compactor.cancel()
        await self.emulator.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> RunningEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def kubeconfig(self, path: Path, namespace: str = "default", token: str = "emulator") -> Path:
        """A kubeconfig for kubectl and Kubernetes clients pointing at the emulator
        (``token``: whose rights, see ``rbac``)."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                    "users": [{"name": "dev", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "dev", "namespace": namespace},
                        }
                    ],
                    "current-context": "emulator",
                }
            )
        )
        return path
