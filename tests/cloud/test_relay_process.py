"""`edgetwin cloud run` and `edgetwin gateway run` as the processes users run: the
relay's kubeconfig handling and config errors, and what both log across link drops."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.running import RunningEmulator
from edgetwin.simulators.link import LinkSim
from edgetwin.simulators.stack import CRDS, make_pki, until
from tests.conftest import EDGETWIN, GatewayProcess, device_doc, model_doc, write_manifests
from tests.harness.processes import Mosquitto, free_port, wait_port

NODE = "edge-01"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[RunningEmulator]:
    async with RunningEmulator(Emulator.from_files(CRDS)) as running:
        running.kubeconfig(tmp_path / "kc", "plant")
        yield running


def relay_yaml(tmp: Path, pki: Path, port: int, **extra: Any) -> Path:
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "tls": {
            "cert_file": str(pki / "relay.pem"),
            "key_file": str(pki / "relay-key.pem"),
            "ca_file": str(pki / "ca.pem"),
        },
        "minStatusInterval": "200ms",
        **extra,
    }
    path = tmp / "relay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_relay(config: Path, home: Path, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"HOME": str(home)}
    return subprocess.run(
        [EDGETWIN, "cloud", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


async def start_relay(config: Path, home: Path, log: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {
        "HOME": str(home),
        "PYTHONUNBUFFERED": "1",
    }
    return await asyncio.create_subprocess_exec(
        EDGETWIN,
        "cloud",
        "run",
        "--config",
        str(config),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


async def test_the_relay_reads_a_kubeconfig_from_home_and_a_chosen_context(
    tmp_path: Path, api: RunningEmulator
) -> None:
    pki = make_pki(tmp_path / "pki", NODE)
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    kc = yaml.safe_load((tmp_path / "kc").read_text())
    # A current context that points nowhere; the relay is told to use another.
    kc["clusters"].append({"name": "nowhere", "cluster": {"server": "http://127.0.0.1:1"}})
    kc["contexts"].append({"name": "nowhere", "context": {"cluster": "nowhere", "user": "dev"}})
    kc["current-context"] = "nowhere"
    (home / ".kube" / "config").write_text(yaml.safe_dump(kc))
    port = free_port()
    config = relay_yaml(tmp_path, pki, port, kubeconfig="~/.kube/config", context="emulator")
    proc = await start_relay(config, home, tmp_path / "relay.log")
    try:
        await asyncio.to_thread(wait_port, port)
        # It serves, against the emulator (the chosen context): a gateway's status lands.
        from lightkube import AsyncClient, KubeConfig

        from edgetwin.cloud.status_writer import Device
        from tests.cloud.test_relay import Gateway, status

        client = AsyncClient(config=KubeConfig.from_file(tmp_path / "kc"))
        await client.create(
            Device(
                metadata={"name": "a1", "namespace": "plant"},
                spec={"nodeName": NODE, "deviceModelRef": {"name": "m"}},
            ),
            namespace="plant",
        )
        gw = Gateway(pki, NODE, port)
        try:
            gw.send({"t": "hello", "proto": 2, "resume": {}})
            gw.send({"t": "status", "dev": "plant.a1", "rev": 1, "patch": status(1, 20.5)})
            await gw.until(lambda r: any(m["t"] == "applied" for m in r))
        finally:
            await gw.close()
            await client.close()
    finally:
        proc.terminate()
        await proc.wait()


def test_relay_configuration_errors_are_named_without_a_traceback(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", NODE)
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()
    cases = [
        ({"kubeconfig": None}, "kubeconfig: null means the in-cluster service account"),
        ({"kubeconfig": str(tmp_path / "kc-missing")}, "kubeconfig:"),
        ({"listen": "no-port-here"}, "listen: expected HOST:PORT"),
    ]
    (tmp_path / "kc").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "only", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "only",
            }
        )
    )
    cases.append(
        ({"kubeconfig": str(tmp_path / "kc"), "context": "other"}, "context: Context 'other' not found")
    )
    for extra, message in cases:
        result = run_relay(relay_yaml(tmp_path, pki, free_port(), **extra), empty_home)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (extra, result.stderr)
    # A key that is not the certificate's.
    other = make_pki(tmp_path / "other-pki", NODE)
    config = relay_yaml(tmp_path, pki, free_port(), kubeconfig=str(tmp_path / "kc"))
    doc = yaml.safe_load(config.read_text())
    doc["tls"]["key_file"] = str(other / "relay-key.pem")
    config.write_text(yaml.safe_dump(doc))
    result = run_relay(config, empty_home)
    assert result.returncode == 2 and "tls.key_file" in result.stderr and "Traceback" not in result.stderr, (
        result.stderr
    )
    # A port another process holds.
    busy = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        result = run_relay(relay_yaml(tmp_path, pki, busy, kubeconfig=str(tmp_path / "kc")), empty_home)
    assert (
        result.returncode == 2
        and "listen: cannot serve" in result.stderr
        and "Traceback" not in result.stderr
    ), result.stderr


async def test_link_drops_are_logged_with_the_reason_and_without_asyncio_noise(
    tmp_path: Path, api: RunningEmulator, mosquitto: Mosquitto
) -> None:
    pki = make_pki(tmp_path / "pki", NODE)
    relay_port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    relay_log = tmp_path / "relay.log"
    relay = await start_relay(
        relay_yaml(tmp_path, pki, relay_port, kubeconfig=str(tmp_path / "kc")), home, relay_log
    )
    link = LinkSim("127.0.0.1", relay_port)
    await link.start()
    manifests = write_manifests(
        tmp_path / "m.yaml",
        [
            model_doc("thermostat", "plant", [{"name": "t", "type": "FLOAT"}]),
            device_doc("t1", "plant", "thermostat", NODE),
        ],
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": NODE,
                "store": {"path": str(tmp_path / "s.db")},
                "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto.port}"},
                "manifests": [str(manifests)],
                "uplink": {
                    "address": f"127.0.0.1:{link.port}",
                    "server_name": "localhost",
                    "ca_file": str(pki / "ca.pem"),
                    "cert_file": str(pki / f"{NODE}.pem"),
                    "key_file": str(pki / f"{NODE}-key.pem"),
                    "reconnect_min_ms": 100,
                },
            }
        )
    )
    gw = GatewayProcess(config, mosquitto.port, NODE, tmp_path / "gateway.log")
    try:
        await asyncio.to_thread(wait_port, relay_port)
        await asyncio.to_thread(gw.start)
        for connects in range(1, 4):
            await until(lambda c=connects: gw.log.read_text().count("uplink connected") >= c, within=30)
            link.cut()
            link.restore()
        await until(lambda: gw.log.read_text().count("uplink connected") >= 4, within=30)
    finally:
        await asyncio.to_thread(gw.stop)
        relay.terminate()
        await relay.wait()
        await link.stop()
    gateway_text, relay_text = gw.log.read_text(), relay_log.read_text()
    for text in (gateway_text, relay_text):
        for noise in (
            "Task was destroyed",
            "aclose(): asynchronous generator",
            "Traceback",
            "Exception ignored",
        ):
            assert noise not in text, f"{noise!r} in:\n{text[-3000:]}"
    downs = [line for line in gateway_text.splitlines() if "uplink down" in line]
    assert len(downs) >= 3 and all("error=" in line and "AioRpcError" not in line for line in downs), downs
    assert any(code in downs[0] for code in ("UNAVAILABLE", "CANCELLED", "INTERNAL", "closed", "dead")), downs
    assert "HTTP Request" not in relay_text  # the API client is quiet at INFO
    assert relay_text.count("gateway connected") >= 4


async def test_relay_stays_ready_while_its_api_request_bucket_is_empty(
    tmp_path: Path, api: RunningEmulator
) -> None:
    """A replica throttled by its own apiQPS (a reconnect storm) still reaches the API
    server: readiness must not fall, or kubelet takes a busy replica out of its Service
    and its gateways pile onto the others. Here the bucket allows one request per 10 s
    and the probe asks every second: a probe that waited for a token would time out."""
    proc, channel, stub = await relay_with_health(tmp_path, apiQPS=0.1, apiBurst=1)
    try:
        await until(lambda: serving(stub), within=10, what="SERVING")
        seen = []
        for _ in range(12):  # six probe intervals
            await asyncio.sleep(0.5)
            seen.append(await serving(stub))
        assert all(seen), seen
    finally:
        await channel.close()
        proc.terminate()
        await proc.wait()
    assert "not ready" not in (tmp_path / "relay.log").read_text()


async def relay_with_health(tmp_path: Path, **extra: Any) -> tuple[Any, Any, Any]:
    """A relay process probing the API every second, its plaintext health port up: the
    process, a channel to the health port and a grpc.health.v1 stub on it."""
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    pki = make_pki(tmp_path / "pki", NODE)
    hport = free_port()
    config = relay_yaml(
        tmp_path,
        pki,
        free_port(),
        kubeconfig=str(tmp_path / "kc"),
        healthListen=f"127.0.0.1:{hport}",
        apiProbeInterval="1s",
        **extra,
    )
    proc = await start_relay(config, tmp_path, tmp_path / "relay.log")
    try:
        await asyncio.to_thread(wait_port, hport)
    except BaseException:
        proc.terminate()
        await proc.wait()
        raise
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{hport}")
    return proc, channel, health_pb2_grpc.HealthStub(channel)


async def serving(stub: Any, service: str = "") -> bool:
    """Whether the health port answers SERVING for ``service`` (False if it does not answer)."""
    import grpc
    from grpc_health.v1 import health_pb2

    try:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def test_relay_readiness_follows_the_api_server_and_metrics_count_api_requests(
    tmp_path: Path, api: RunningEmulator
) -> None:
    """kubelet's view: the plaintext grpc.health.v1 port says SERVING only while the
    API server answers; /healthz says why not; /metrics counts API requests by verb and
    code."""
    import httpx
    from grpc_health.v1 import health_pb2

    mport = free_port()
    proc, channel, stub = await relay_with_health(tmp_path, metricsListen=f"127.0.0.1:{mport}")
    web = httpx.AsyncClient(base_url=f"http://127.0.0.1:{mport}")

    async def not_serving() -> bool:
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        return bool(answer.status == health_pb2.HealthCheckResponse.NOT_SERVING)

    try:
        await until(lambda: serving(stub), within=10, what="SERVING")
        assert await serving(stub, "edgetwin.sync.v1.Sync")
        assert (await web.get("/healthz")).status_code == 200
        metrics = (await web.get("/metrics")).text
        # The probe's own GET of a Gateway that does not exist: a 404 is an answer.
        assert 'edgetwin_relay_api_requests_total{code="404",verb="GET"}' in metrics
        assert "edgetwin_relay_api_reachable 1.0" in metrics
        assert "edgetwin_relay_api_throttled_seconds_total 0.0" in metrics  # apiQPS: 100, no storm

        await api.stop()  # the API server goes away
        await until(not_serving, within=5, what="NOT_SERVING")
        health = await web.get("/healthz")
        assert health.status_code == 503 and "cannot reach the API server" in health.json()["problems"][0]
        assert "edgetwin_relay_api_reachable 0.0" in (await web.get("/metrics")).text

        back = RunningEmulator(api.emulator, port=api.port)
        await back.start()
        try:
            await until(lambda: serving(stub), within=5, what="SERVING again")
        finally:
            await back.stop()
    finally:
        await web.aclose()
        await channel.close()
        proc.terminate()
        await proc.wait()
    assert "Traceback" not in (tmp_path / "relay.log").read_text()
