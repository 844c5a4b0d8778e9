"""A whole edgetwin system on loopback, for tests, benchmarks and the chaos harness (a
development stand-in like the API emulator and the link simulator, never production):

    gateway (in this process) -> [link simulator] -> relay (in this process) -> lightkube
    -> Kubernetes API emulator, with a test PKI (mutual TLS) and a kubeconfig for kubectl.

The MQTT broker is the caller's (a mosquitto on a free port). Each part can be stopped,
started again and restarted on the same ports, so a test can cut the link, kill the
relay or restart the gateway on an established system.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgetwin.deploy import DEPLOY, crd_files
from edgetwin.runtime.aio import wait_within

CRDS = crd_files()
# The relay talks to the API emulator as its service account, with the rights the
# shipped ClusterRole (deploy/relay/rbac.yaml) grants: a relay needing more fails here.
RELAY_USER = "system:serviceaccount:edgetwin-system:edgetwin-relay"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def relay_rbac() -> list[dict[str, Any]]:
    docs = yaml.safe_load_all((DEPLOY / "relay" / "rbac.yaml").read_text())
    role = next(d for d in docs if d and d.get("kind") == "ClusterRole")
    return list(role["rules"])


def make_pki(out: Path, *nodes: str) -> Path:
    """A test PKI (deploy/pki/make-test-pki): CA, relay certificate, one per node."""
    if not (out / "ca.pem").exists():
        subprocess.run(
            [str(DEPLOY / "pki" / "make-test-pki"), str(out), *nodes],
            check=True,
            capture_output=True,
        )
    return out


@dataclass
class StackOptions:
    node: str = "edge-01"
    mqtt_url: str = ""  # the broker's mqtt://host:port
    manifests: list[Path] = field(default_factory=list)
    # Link simulator between gateway and relay (None: direct).
    link_bps: float | None = None  # bits/s
    link_latency_s: float = 0.0
    use_link: bool = True
    emulator: dict[str, Any] = field(default_factory=dict)  # Emulator keyword options
    relay: dict[str, Any] = field(default_factory=dict)  # RelaySettings fields
    uplink: dict[str, Any] = field(default_factory=dict)  # gateway uplink: keys
    gateway: dict[str, Any] = field(default_factory=dict)  # other gateway config keys


class Stack:
    """``async with Stack(tmp, options) as stack:`` starts everything; parts restart."""

    def __init__(self, workdir: Path, options: StackOptions) -> None:
        self.dir, self.opt = workdir, options
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(self.dir / "pki", options.node)
        self.kubeconfig = self.dir / "kubeconfig"
        self.relay_port = free_port()
        self.api: Any = None
        self.client: Any = None
        self.relay: Any = None
        self.relay_service: Any = None
        self.link: Any = None
        self.gateway: Any = None
        self._gateway_task: asyncio.Task[None] | None = None
        self._gateway_stop: asyncio.Event | None = None

    # ----------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        from lightkube import AsyncClient, KubeConfig

        from edgetwin.simulators.kube.emulator import Emulator
        from edgetwin.simulators.kube.running import RunningEmulator

        options = {"rbac": {RELAY_USER: relay_rbac()}, **self.opt.emulator}
        self.api = RunningEmulator(Emulator.from_files(CRDS, **options))
        await self.api.start()
        self.api.kubeconfig(self.kubeconfig, "plant")
        relay_kubeconfig = self.api.kubeconfig(self.dir / "relay-kubeconfig", "plant", RELAY_USER)
        self.client = AsyncClient(
            config=KubeConfig.from_file(relay_kubeconfig), field_manager="edgetwin-relay"
        )
        await self.start_relay()
        if self.opt.use_link:
            from edgetwin.simulators.link import LinkSim

            self.link = LinkSim(
                "127.0.0.1",
                self.relay_port,
                bandwidth_bps=self.opt.link_bps,
                latency_s=self.opt.link_latency_s,
            )
            await self.link.start()
        await self.start_gateway()

    async def stop(self) -> None:
        await self.stop_gateway()
        await self.stop_relay()
        if self.link is not None:
            await self.link.stop()
        if self.client is not None:
            await self.client.close()
        if self.api is not None:
            await self.api.stop()

    async def start_relay(self) -> None:
        from edgetwin.cloud.relay import read_pki, serve
        from edgetwin.cloud.session import RelaySettings

        settings = RelaySettings(**{"min_status_interval_s": 0.5, "flush_s": 0.01, **self.opt.relay})
        self.relay, self.relay_service, _ = await serve(
            self.client, f"127.0.0.1:{self.relay_port}", *read_pki(self.pki), settings
        )

    async def stop_relay(self) -> None:
        if self.relay is not None:
            await self.relay.stop(None)
            self.relay = None

    async def restart_relay(self) -> None:
        await self.stop_relay()
        await self.start_relay()

    def gateway_config(self) -> Any:
        from edgetwin.gateway.config import parse_config

        port = self.link.port if self.link is not None else self.relay_port
        node = self.opt.node
        return parse_config(
            {
                "node": node,
                "store": {"path": str(self.dir / "store.db")},
                "mqtt": {"url": self.opt.mqtt_url, "client_id": f"gw-{node}-{time.time_ns()}"},
                "manifests": [str(m) for m in self.opt.manifests],
                "uplink": {
                    "address": f"127.0.0.1:{port}",
                    "server_name": "localhost",
                    "ca_file": str(self.pki / "ca.pem"),
                    "cert_file": str(self.pki / f"{node}.pem"),
                    "key_file": str(self.pki / f"{node}-key.pem"),
                    "reconnect_min_ms": 100,
                    "reconnect_max_ms": 2000,
                    **self.opt.uplink,
                },
                **self.opt.gateway,
            }
        )

    async def start_gateway(self) -> None:
        from edgetwin.gateway.service import Gateway

        self.gateway = Gateway(self.gateway_config())
        self._gateway_stop = asyncio.Event()
        self._gateway_task = asyncio.create_task(self.gateway.run(self._gateway_stop))
        ready = asyncio.ensure_future(self.gateway.ready.wait())
        done, _ = await asyncio.wait(
            {ready, self._gateway_task}, timeout=30, return_when=asyncio.FIRST_COMPLETED
        )
        if self._gateway_task in done:
            ready.cancel()
            self._gateway_task.result()  # raises why it ended
        if ready not in done:
            raise TimeoutError("the gateway did not get ready within 30 s")

    async def stop_gateway(self) -> None:
        if self._gateway_task is not None and self._gateway_stop is not None:
            self._gateway_stop.set()
            with contextlib.suppress(Exception):
                await wait_within(self._gateway_task, 30)
            self._gateway_task = None

    async def restart_gateway(self) -> None:
        await self.stop_gateway()
        await self.start_gateway()

    # ----------------------------------------------------------------- helpers
    async def connected(self, within: float = 30) -> None:
        await wait_within(self.gateway.uplink.connected.wait(), within)

    async def kubectl(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "HOME": str(self.dir), **(env or {})}
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "kubectl"),
            *args,
            env=env,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        return subprocess.CompletedProcess(list(args), proc.returncode or 0, out.decode(), err.decode())

    async def apply(self, docs: list[dict[str, Any]]) -> None:
        """``kubectl apply`` of objects (the real kubectl, as a user would)."""
        result = await self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
        if result.returncode != 0:
            raise RuntimeError(f"kubectl apply failed: {result.stderr}")

    async def device(self, name: str, namespace: str = "plant") -> dict[str, Any]:
        from edgetwin.cloud.status_writer import Device

        obj = await self.client.get(Device, name, namespace=namespace)
        return obj.to_dict()  # type: ignore[no-any-return]

    async def gateway_status(self) -> dict[str, Any]:
        """The node's Gateway status ({} before the relay wrote it)."""
        from edgetwin.cloud.gateway_status import Gateway

        try:
            obj = await self.client.get(Gateway, self.opt.node)
        except Exception:
            return {}
        return obj.to_dict().get("status") or {}

    async def status_twins(self, name: str, namespace: str = "plant") -> dict[str, dict[str, Any]]:
        status = (await self.device(name, namespace)).get("status") or {}
        return {t["propertyName"]: t for t in status.get("twins") or []}


async def until(pred: Any, within: float = 10.0, every: float = 0.05, what: str = "condition") -> float:
    """Wait until ``pred()`` (a function, maybe async) is true; returns the seconds it took."""
    started = time.monotonic()
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what} not reached within {within} s")
        await asyncio.sleep(every)
