"""Cloud sync end to end: a device on real mosquitto -> the gateway -> the uplink (gRPC,
mutual TLS) -> the relay -> lightkube -> the Kubernetes API emulator, read with the real
kubectl; and a desired value patched with kubectl back down to the device."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig

from edgetwin.cloud.relay import read_pki, serve
from edgetwin.cloud.session import RelaySettings
from edgetwin.gateway.config import GatewayConfig, parse_config
from edgetwin.gateway.mqtt import topics
from edgetwin.gateway.service import Gateway
from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.running import RunningEmulator
from edgetwin.simulators.link import LinkSim
from tests.conftest import BIN, Collector, publish, update_payload
from tests.harness.processes import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "deploy" / "crds").glob("*.yaml"))
EXAMPLE = ROOT / "deploy" / "examples" / "manifests" / "thermostat.yaml"
NODE = "edge-01"
DEV = "plant.thermostat-hall"


async def kubectl(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(tmp / "kc"), "HOME": str(tmp)}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "kubectl"), *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


def gateway_config(
    tmp_path: Path, mosquitto: Mosquitto, pki: Path, relay_port: int, **uplink: Any
) -> GatewayConfig:
    """The example thermostat's gateway on the test broker, with an uplink to the relay."""
    return parse_config(
        {
            "node": NODE,
            "store": {"path": str(tmp_path / "s.db")},
            "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto.port}", "client_id": f"gw-{time.time_ns()}"},
            "manifests": [str(EXAMPLE)],
            "uplink": {
                "address": f"127.0.0.1:{relay_port}",
                "server_name": "localhost",
                "ca_file": str(pki / "ca.pem"),
                "cert_file": str(pki / f"{NODE}.pem"),
                "key_file": str(pki / f"{NODE}-key.pem"),
                **uplink,
            },
        }
    )


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    out = tmp_path / "pki"
    subprocess.run(
        [str(ROOT / "deploy" / "pki" / "make-test-pki"), str(out), NODE], check=True, capture_output=True
    )
    return out


@pytest.fixture
def link() -> LinkHolder:
    return LinkHolder()


class LinkHolder:
    """Set ``use`` before the stack starts to put a LinkSim between gateway and relay."""

    use = False
    sim: LinkSim | None = None


@pytest.fixture
async def system(
    tmp_path: Path, mosquitto: Mosquitto, pki: Path, link: LinkHolder
) -> AsyncIterator[tuple[Gateway, RunningEmulator]]:
    async with RunningEmulator(Emulator.from_files(CRDS)) as api:
        api.kubeconfig(tmp_path / "kc", "plant")
        r = await kubectl(tmp_path, "apply", "-f", str(EXAMPLE))
        assert r.returncode == 0, r.stderr
        client = AsyncClient(config=KubeConfig.from_file(tmp_path / "kc"))
        server, _, port = await serve(
            client,
            "127.0.0.1:0",
            *read_pki(pki),
            RelaySettings(min_status_interval_s=0.5, flush_s=0.01),
        )
        if link.use:
            link.sim = LinkSim("127.0.0.1", port)
            await link.sim.start()
            port = link.sim.port
        gw = Gateway(gateway_config(tmp_path, mosquitto, pki, port))
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        await asyncio.wait_for(gw.ready.wait(), 15)
        yield gw, api
        stop.set()
        await asyncio.wait_for(task, 15)
        await server.stop(None)
        if link.sim is not None:
            await link.sim.stop()
        await client.close()


async def test_kubectl_follows_the_twin_and_a_cloud_desired_value_reaches_the_device(
    system: tuple[Gateway, RunningEmulator], tmp_path: Path, mosquitto: Mosquitto
) -> None:
    gw, _ = system
    await asyncio.wait_for(gw.uplink.connected.wait(), 10)
    deltas = Collector(mosquitto.port, [topics.twin_update_delta(DEV), topics.gateway_status(NODE)])
    try:
        # The gateway is subscribed once it has announced itself (retained "online").
        await asyncio.to_thread(
            deltas.wait_for, lambda t, p: t == topics.gateway_status(NODE) and p == b"online", 10
        )
        # A device (an external mapper on MQTT) reports; kubectl shows it within 2 s.
        sent = time.monotonic()
        await asyncio.to_thread(
            publish,
            mosquitto.port,
            topics.twin_update(DEV),
            update_payload({"temperature": 21.5, "humidity": 40}),
        )
        for _ in range(100):
            r = await kubectl(tmp_path, "get", "devices")
            if "temperature=21.5" in r.stdout:
                break
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - sent
        assert "temperature=21.5" in r.stdout, r.stdout
        assert elapsed < 2.0, elapsed
        row = r.stdout.splitlines()[1].split()
        assert row[:2] == ["thermostat-hall", "edge-01"]
        # The status carries versions; the outbox entry left once the relay applied it.
        obj = json.loads((await kubectl(tmp_path, "get", "dev", "thermostat-hall", "-o", "json")).stdout)
        twins = {t["propertyName"]: t for t in obj["status"]["twins"]}
        assert twins["temperature"]["reported"]["value"] == "21.5"
        for _ in range(100):
            if DEV not in gw.engine.outbox:
                break
            await asyncio.sleep(0.05)
        assert DEV not in gw.engine.outbox
        # The relay answered in the compact form this gateway offers (wire: appliedRevs).
        assert gw.uplink.received["appliedRevs"] >= 1 and gw.uplink.received["applied"] == 0
        # kubectl patch of a desired value reaches the device as a delta.
        patch = (
            '{"spec":{"properties":[{"name":"setpoint","desired":{"value":"23"}},{"name":"temperature"}]}}'
        )
        r = await kubectl(tmp_path, "patch", "device", "thermostat-hall", "--type=merge", "-p", patch)
        assert r.returncode == 0, r.stderr

        def has_setpoint_23(topic: str, payload: bytes) -> bool:
            if topic != topics.twin_update_delta(DEV):
                return False
            delta: dict[str, Any] = json.loads(payload).get("delta", {})
            return str(delta.get("setpoint")) in ("23", "23.0")

        await asyncio.to_thread(deltas.wait_for, has_setpoint_23, 10)
        desired = gw.engine.devices[DEV].properties["setpoint"].desired
        assert desired is not None and desired.value == 23.0 and desired.origin == "cloud"
    finally:
        deltas.close()


@pytest.fixture
def via_link(link: LinkHolder) -> LinkHolder:
    link.use = True
    return link


async def test_a_half_open_link_is_noticed_within_30_s_and_recovered(
    via_link: LinkHolder, system: tuple[Gateway, RunningEmulator], tmp_path: Path, mosquitto: Mosquitto
) -> None:
    gw, _ = system
    assert via_link.sim is not None
    await asyncio.wait_for(gw.uplink.connected.wait(), 10)
    # Packets silently dropped both ways: no FIN, no RST, the socket stays open.
    via_link.sim.blackhole(True)
    dropped = time.monotonic()
    while gw.uplink.connected.is_set():
        assert time.monotonic() - dropped < 30, "a half-open link was not noticed within 30 s"
        await asyncio.sleep(0.2)
    noticed = time.monotonic() - dropped
    # A change made while the link is down reaches the cloud once it is back.
    await asyncio.to_thread(
        publish, mosquitto.port, topics.twin_update(DEV), update_payload({"temperature": 30.5})
    )
    via_link.sim.restore()
    await asyncio.wait_for(gw.uplink.connected.wait(), 30)
    for _ in range(200):
        obj = json.loads((await kubectl(tmp_path, "get", "dev", "thermostat-hall", "-o", "json")).stdout)
        if "temperature=30.5" in (obj.get("status") or {}).get("summary", ""):
            break
        await asyncio.sleep(0.05)
    assert "temperature=30.5" in obj["status"]["summary"]
    assert gw.uplink.connects >= 2
    assert noticed < 30


@pytest.mark.parametrize("cloud_first", [False, True], ids=["edge-then-cloud", "cloud-then-edge"])
async def test_an_outage_with_edits_on_both_sides_reconciles_exactly_across_a_relay_restart(
    tmp_path: Path, mosquitto: Mosquitto, pki: Path, cloud_first: bool
) -> None:
    """The link is cut during a (time-compressed) day of changes while the setpoint is
    edited at the edge and, later, in the cloud; the relay is killed and restarted in
    the middle of the drain. Afterwards cloud status equals the edge twin for every
    property, the conflict is resolved by the rule and visible in status."""
    from edgetwin.gateway.mqtt import payloads
    from tests.harness.processes import free_port

    async with RunningEmulator(Emulator.from_files(CRDS)) as api:
        api.kubeconfig(tmp_path / "kc", "plant")
        assert (await kubectl(tmp_path, "apply", "-f", str(EXAMPLE))).returncode == 0
        client = AsyncClient(config=KubeConfig.from_file(tmp_path / "kc"))
        relay_port = free_port()

        async def start_relay() -> Any:
            server, _, _ = await serve(
                client, f"127.0.0.1:{relay_port}", *read_pki(pki), RelaySettings(0.3, flush_s=0.01)
            )
            return server

        relay = await start_relay()
        link = LinkSim("127.0.0.1", relay_port, bandwidth_bps=64_000)
        await link.start()
        gw = Gateway(
            gateway_config(tmp_path, mosquitto, pki, link.port, reconnect_min_ms=100, reconnect_max_ms=1000)
        )
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        try:
            await asyncio.wait_for(gw.ready.wait(), 15)
            await asyncio.wait_for(gw.uplink.connected.wait(), 10)
            # Outage: a "day" of reported changes, and an edge desired edit.
            link.cut()
            for i in range(100):
                values = {"temperature": round(15 + i / 10, 1), "humidity": 30 + i % 40}
                await asyncio.to_thread(
                    publish, mosquitto.port, topics.twin_update(DEV), update_payload(values, event_id=f"e{i}")
                )
            patch = json.dumps(
                {
                    "spec": {
                        "properties": [
                            {"name": "setpoint", "desired": {"value": "19"}},
                            {"name": "temperature"},
                        ]
                    }
                }
            )

            async def edge_edit() -> None:
                edge_set = payloads.twin_set_request("edge-edit", int(time.time() * 1000), {"setpoint": 25})
                await asyncio.to_thread(publish, mosquitto.port, topics.twin_update(DEV), edge_set)

            async def cloud_edit() -> None:
                r = await kubectl(tmp_path, "patch", "device", "thermostat-hall", "--type=merge", "-p", patch)
                assert r.returncode == 0, r.stderr

            # Both sides edit the setpoint while offline; the later write wins (the rule).
            # (The API server keeps write times to the second: let one pass in between.)
            first, second = (cloud_edit, edge_edit) if cloud_first else (edge_edit, cloud_edit)
            await first()
            await asyncio.sleep(1.1)
            await second()
            props = gw.engine.devices[DEV].properties
            for _ in range(200):
                if props["temperature"].reported and props["temperature"].reported.value == 24.9:
                    break
                await asyncio.sleep(0.02)
            # The link returns; the relay dies in the middle of the drain and comes back.
            link.restore()
            await asyncio.wait_for(gw.uplink.connected.wait(), 30)
            await relay.stop(None)
            relay = await start_relay()
            for _ in range(300):
                if not gw.engine.outbox and gw.uplink.connected.is_set():
                    break
                await asyncio.sleep(0.05)
            assert not gw.engine.outbox, "the outbox did not drain"
            obj = json.loads((await kubectl(tmp_path, "get", "dev", "thermostat-hall", "-o", "json")).stdout)
            status = obj["status"]
            twins = {t["propertyName"]: t for t in status["twins"]}
            # Cloud status equals the edge twin, property by property.
            for name, prop in props.items():
                if prop.reported is not None:
                    assert twins[name]["reported"]["value"] == str(prop.reported.value), name
                    assert twins[name]["reported"]["metadata"]["version"] == str(prop.reported.version), name
            assert twins["temperature"]["reported"]["value"] == "24.9"
            # The conflict: the cloud's later write won, the loser is visible.
            desired = props["setpoint"].desired
            winner, value, loser = ("edge", 25.0, "19") if cloud_first else ("cloud", 19.0, "25")
            assert desired is not None and desired.origin == winner and desired.value == value
            assert twins["setpoint"]["observedDesired"]["value"] == str(value)
            assert twins["setpoint"]["observedDesired"]["metadata"]["origin"] == winner
            conditions = {c["type"]: c for c in status.get("conditions", [])}
            assert "DesiredConflict" in conditions and loser in conditions["DesiredConflict"]["message"]
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            await relay.stop(None)
            await link.stop()
            await client.close()


async def test_the_last_seen_resource_version_is_kept_in_the_store(
    system: tuple[Gateway, RunningEmulator],
) -> None:
    from edgetwin.gateway.service import UPLINK_RESUME_KEY
    from edgetwin.gateway.store.reader import open_reader

    gw, api = system
    await asyncio.wait_for(gw.uplink.connected.wait(), 10)
    reader = open_reader(gw.cfg.store.path)
    saved: dict[str, str] = {}
    for _ in range(200):
        row = reader.execute("SELECT value FROM meta WHERE key = ?", [UPLINK_RESUME_KEY]).fetchone()
        saved = json.loads(row[0]) if row else {}
        if saved.get("Device") and saved.get("DeviceModel") and saved == gw.uplink.resume:
            break
        await asyncio.sleep(0.05)
    # What the relay's relist reported; a restarted gateway sends it in its hello.
    assert saved.get("Device") and int(saved["Device"]) <= api.emulator.rv
    assert saved == gw.uplink.resume
