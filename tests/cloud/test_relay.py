"""The relay end to end on its side: gateways (scripted with the generated stubs and the
wire module) over mutual TLS, the relay, lightkube and the Kubernetes API emulator.
A node sees and writes only its own Devices; status is applied and acknowledged; a
second stream (as after a relay restart) resumes from the gateway's resourceVersion."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.types import PatchType

from edgetwin.cloud.relay import read_pki, serve
from edgetwin.cloud.session import RelaySettings
from edgetwin.cloud.status_writer import Device
from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.running import RunningEmulator
from edgetwin.sync.v1 import sync_pb2, sync_pb2_grpc
from edgetwin.sync.wire import (
    CAP_APPLIED_REVS,
    CLOUD_TO_EDGE,
    PROTOCOL_VERSION,
    FrameDecoder,
    Incoming,
    decode_revs,
    encode_batch,
)

ROOT = Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "deploy" / "crds").glob("*.yaml"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    subprocess.run([str(ROOT / "deploy" / "pki" / "make-test-pki"), str(out), "edge-a", "edge-b"], check=True)
    return out


@contextlib.asynccontextmanager
async def running_relay(
    tmp_path: Path, pki: Path, settings: RelaySettings, **emulator: Any
) -> AsyncIterator[tuple[RunningEmulator, AsyncClient, int]]:
    """The API emulator with Devices a1, a2 (node edge-a) and b1 (edge-b), and a relay."""
    async with RunningEmulator(Emulator.from_files(CRDS, **emulator)) as api:
        client = AsyncClient(config=KubeConfig.from_file(api.kubeconfig(tmp_path / "kc", "plant")))
        for name, node in (("a1", "edge-a"), ("a2", "edge-a"), ("b1", "edge-b")):
            obj = Device(
                metadata={"name": name, "namespace": "plant"},
                spec={"nodeName": node, "deviceModelRef": {"name": "m"}},
            )
            await client.create(obj, namespace="plant")
        server, _, port = await serve(client, "127.0.0.1:0", *read_pki(pki), settings)
        try:
            yield api, client, port
        finally:
            await server.stop(None)
            await client.close()


@pytest.fixture
async def relay(tmp_path: Path, pki: Path) -> AsyncIterator[tuple[RunningEmulator, AsyncClient, int]]:
    async with running_relay(
        tmp_path, pki, RelaySettings(min_status_interval_s=0.2, flush_s=0.01)
    ) as running:
        yield running


class Gateway:
    """A scripted gateway: sends batches, collects what the relay sends."""

    def __init__(self, pki: Path, node: str, port: int) -> None:
        creds = grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(),
            (pki / f"{node}-key.pem").read_bytes(),
            (pki / f"{node}.pem").read_bytes(),
        )
        self.channel = grpc.aio.secure_channel(f"localhost:{port}", creds)
        self.send_q: asyncio.Queue[sync_pb2.Frame] = asyncio.Queue()
        self.received: list[dict[str, Any]] = []
        self.incoming = Incoming()
        self.decoder = FrameDecoder()
        self.seq = 0
        self.acks: list[int] = []  # the ack of every frame the relay sent
        self.frames: list[int] = []  # the seq of every frame the relay sent (0: bare)
        self.call = sync_pb2_grpc.SyncStub(self.channel).Link(self._frames())
        self.task = asyncio.create_task(self._read())

    async def _frames(self) -> AsyncIterator[sync_pb2.Frame]:
        while True:
            yield await self.send_q.get()

    async def _read(self) -> None:
        async for frame in self.call:
            self.acks.append(frame.ack)
            self.frames.append(frame.seq)
            if frame.seq and self.incoming.accept(frame.seq):
                self.received += self.decoder.decode(frame.encoding, frame.payload, CLOUD_TO_EDGE)
                self.send_q.put_nowait(sync_pb2.Frame(seq=0, ack=self.incoming.ack))

    def echo(self) -> None:
        self.send_q.put_nowait(sync_pb2.Frame(seq=0, ack=self.incoming.ack, echo=True))

    def send(self, *messages: dict[str, Any]) -> None:
        self.seq += 1
        encoding, payload = encode_batch(list(messages))
        self.send_q.put_nowait(
            sync_pb2.Frame(seq=self.seq, ack=self.incoming.ack, encoding=encoding, payload=payload)
        )  # type: ignore[arg-type]

    async def until(self, pred: Any, within: float = 10) -> None:
        for _ in range(int(within / 0.02)):
            if pred(self.received):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"not reached; received {self.received}")

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()


def names(msgs: list[dict[str, Any]], kind: str = "upsert") -> set[str]:
    return {m["obj"]["metadata"]["name"] for m in msgs if m["t"] == kind and m["kind"] == "Device"}


def status(rev: int, temp: float) -> dict[str, Any]:
    return {
        "state": "online",
        "twins": {"temperature": {"reported": {"value": str(temp), "metadata": {"version": str(rev)}}}},
    }


async def test_a_node_sees_and_writes_only_its_own_devices(
    relay: tuple[RunningEmulator, AsyncClient, int], pki: Path
) -> None:
    api, client, port = relay
    a = Gateway(pki, "edge-a", port)
    b = Gateway(pki, "edge-b", port)
    try:
        a.send({"t": "hello", "proto": PROTOCOL_VERSION, "resume": {}})
        b.send({"t": "hello", "proto": PROTOCOL_VERSION, "resume": {}})
        await a.until(lambda r: any(m["t"] == "synced" and m["kind"] == "Device" for m in r))
        await b.until(lambda r: any(m["t"] == "synced" and m["kind"] == "Device" for m in r))
        assert names(a.received) == {"a1", "a2"} and names(b.received) == {"b1"}
        # Status for its own device is written and acknowledged; for another node's, refused.
        a.send({"t": "status", "dev": "plant.a1", "rev": 7, "patch": status(3, 21.5)})
        a.send({"t": "status", "dev": "plant.b1", "rev": 8, "patch": status(1, 99.0)})
        await a.until(lambda r: {m["t"] for m in r if m.get("dev")} >= {"applied", "refused"})
        answers = {m["dev"]: m for m in a.received if m["t"] in ("applied", "refused")}
        assert answers["plant.a1"] == {"t": "applied", "dev": "plant.a1", "rev": 7}
        assert answers["plant.b1"]["t"] == "refused" and "edge-b" in answers["plant.b1"]["reason"]
        a1 = await client.get(Device, "a1", namespace="plant")
        assert a1["status"]["summary"] == "temperature=21.5"
        b1 = await client.get(Device, "b1", namespace="plant")
        assert "status" not in b1 or not b1["status"]
        assert api.emulator.status_writes[("plant", "b1")] == 0
        # A cloud change to b1's spec reaches edge-b, never edge-a.
        desired = {"spec": {"properties": [{"name": "setpoint", "desired": {"value": "5"}}]}}
        await client.patch(Device, "b1", desired, namespace="plant", patch_type=PatchType.MERGE)
        await b.until(lambda r: any(m["t"] == "upsert" and m["obj"]["spec"].get("properties") for m in r))
        upserts = [m for m in b.received if m["t"] == "upsert" and m["kind"] == "Device"]
        assert [m["obj"]["metadata"]["name"] for m in upserts] == ["b1", "b1"], upserts
        assert names(a.received) == {"a1", "a2"}
    finally:
        await a.close()
        await b.close()


async def test_a_gateway_that_offers_applied_revs_gets_its_answers_compactly(
    relay: tuple[RunningEmulator, AsyncClient, int], pki: Path
) -> None:
    """Whole revisions applied come as one ``appliedRevs``; parts and refusals keep their
    own messages; a frame nothing answers is still acknowledged (by a bare ack)."""
    _, _, port = relay
    a = Gateway(pki, "edge-a", port)
    try:
        a.send({"t": "hello", "proto": PROTOCOL_VERSION, "resume": {}, "caps": [CAP_APPLIED_REVS]})
        await a.until(lambda r: any(m["t"] == "synced" and m["kind"] == "Device" for m in r))
        a.send(
            {"t": "status", "dev": "plant.a1", "rev": 100, "patch": status(1, 20.0)},
            {"t": "status", "dev": "plant.a2", "rev": 103, "patch": status(1, 21.0)},
            {"t": "status", "dev": "plant.b1", "rev": 104, "patch": status(1, 22.0)},
        )

        def revs(r: list[dict[str, Any]]) -> list[int]:
            return [rev for m in r if m["t"] == "appliedRevs" for rev in decode_revs(m["revs"])]

        await a.until(lambda r: set(revs(r)) >= {100, 103} and any(m["t"] == "refused" for m in r))
        a.send({"t": "status", "dev": "plant.a2", "rev": 105, "patch": status(2, 23.0), "part": [0, 2]})
        await a.until(lambda r: any(m["t"] == "applied" for m in r))
        assert sorted(revs(a.received)) == [100, 103]
        assert [(m["dev"], m["rev"], m.get("part")) for m in a.received if m["t"] == "applied"] == [
            ("plant.a2", 105, 0)
        ]
        assert [m["rev"] for m in a.received if m["t"] == "refused"] == [104]
        # stats are not answered: the relay acknowledges the frame by itself.
        a.send({"t": "stats", "s": {"devices": 2, "devicesNotReady": 0, "backlog": 0, "oldestMs": 0}})
        for _ in range(150):
            if a.acks and a.acks[-1] == a.seq:
                break
            await asyncio.sleep(0.02)
        assert a.acks[-1] == a.seq, a.acks[-5:]
    finally:
        await a.close()


async def test_resume_points_ride_on_heartbeat_answers_and_never_wait_longer_than_half_rv_every(
    tmp_path: Path, pki: Path
) -> None:
    """An idle stream in a busy cluster: the relay's rv messages (resume point moved on)
    wait for the answer to the gateway's next heartbeat instead of costing frames of their
    own, but no longer than rv_every_s / 2 when no heartbeat comes."""
    settings = RelaySettings(rv_every_s=2.0, flush_s=0.01)
    async with running_relay(tmp_path, pki, settings, bookmark_s=0.1) as (_, client, port):
        a = Gateway(pki, "edge-a", port)

        async def churn() -> None:  # another node's Device changes: the API server moves on
            i = 0
            while True:
                i += 1
                patch = {"spec": {"properties": [{"name": "x", "desired": {"value": str(i)}}]}}
                await client.patch(Device, "b1", patch, namespace="plant", patch_type=PatchType.MERGE)
                await asyncio.sleep(0.1)

        churning = asyncio.create_task(churn())
        try:
            a.send({"t": "hello", "proto": PROTOCOL_VERSION, "resume": {}})
            await a.until(lambda r: sum(m["t"] == "synced" for m in r) == 2)
            await asyncio.sleep(0.5)
            # A silent gateway: rv still comes, on its own, once the hold (1 s) is over.
            start = asyncio.get_running_loop().time()
            await a.until(lambda r: any(m["t"] == "rv" for m in r), within=6)
            assert asyncio.get_running_loop().time() - start <= 2 + 1 + 1
            # Heartbeats every 0.4 s (within the hold): every frame the relay sends is the
            # answer to one of them, and the resume points keep moving.
            await asyncio.sleep(0.3)
            rvs, frames = sum(m["t"] == "rv" for m in a.received), len(a.frames)
            for _ in range(15):
                a.echo()
                await asyncio.sleep(0.4)
            await asyncio.sleep(0.3)
            assert len(a.frames) - frames == 15, a.frames[frames:]
            assert sum(m["t"] == "rv" for m in a.received) >= rvs + 2
            assert any(seq for seq in a.frames[frames:]), "no rv rode on a heartbeat answer"
        finally:
            churning.cancel()
            await a.close()


async def test_a_new_stream_resumes_from_the_gateways_resource_version(
    relay: tuple[RunningEmulator, AsyncClient, int], pki: Path
) -> None:
    _, client, port = relay
    a = Gateway(pki, "edge-a", port)
    a.send({"t": "hello", "proto": PROTOCOL_VERSION, "resume": {}})
    await a.until(lambda r: any(m["t"] == "synced" and m["kind"] == "Device" for m in r))
    rv = next(m["rv"] for m in a.received if m["t"] == "synced" and m["kind"] == "Device")
    await a.close()  # the link drops (or the relay restarts)
    desired = {"spec": {"properties": [{"name": "setpoint", "desired": {"value": "23"}}]}}
    await client.patch(Device, "a2", desired, namespace="plant", patch_type=PatchType.MERGE)
    again = Gateway(pki, "edge-a", port)
    try:
        again.send({"t": "hello", "proto": PROTOCOL_VERSION, "resume": {"Device": rv}})
        await again.until(lambda r: names(r) == {"a2"})
        await asyncio.sleep(0.3)
        assert names(again.received) == {"a2"}  # only what changed; no relist
        assert not any(m["t"] == "synced" and m["kind"] == "Device" for m in again.received)
        change = next(m for m in again.received if m["t"] == "upsert" and m["kind"] == "Device")
        assert change["obj"]["spec"]["properties"][0]["desired"]["value"] == "23"
    finally:
        await again.close()


async def test_a_client_without_a_certificate_is_refused(
    relay: tuple[RunningEmulator, AsyncClient, int], pki: Path
) -> None:
    _, _, port = relay
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
        call = sync_pb2_grpc.SyncStub(channel).Link(iter([sync_pb2.Frame(seq=0)]))
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in call:
                pass


async def test_edgetwin_cloud_run_serves_the_relay(tmp_path: Path, pki: Path) -> None:
    import yaml

    from tests.conftest import EDGETWIN
    from tests.harness.processes import free_port, wait_port

    async with RunningEmulator(Emulator.from_files(CRDS)) as api:
        client = AsyncClient(config=KubeConfig.from_file(api.kubeconfig(tmp_path / "kc", "plant")))
        obj = Device(
            metadata={"name": "a1", "namespace": "plant"},
            spec={"nodeName": "edge-a", "deviceModelRef": {"name": "m"}},
        )
        await client.create(obj, namespace="plant")
        port = free_port()
        config = {
            "listen": f"127.0.0.1:{port}",
            "tls": {
                "cert_file": str(pki / "relay.pem"),
                "key_file": str(pki / "relay-key.pem"),
                "ca_file": str(pki / "ca.pem"),
            },
            "kubeconfig": str(tmp_path / "kc"),
            "minStatusInterval": "200ms",
        }
        (tmp_path / "relay.yaml").write_text(yaml.safe_dump(config))
        proc = await asyncio.create_subprocess_exec(
            EDGETWIN,
            "cloud",
            "run",
            "--config",
            str(tmp_path / "relay.yaml"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.to_thread(wait_port, port)
            gw = Gateway(pki, "edge-a", port)
            try:
                gw.send({"t": "hello", "proto": PROTOCOL_VERSION, "resume": {}})
                gw.send({"t": "status", "dev": "plant.a1", "rev": 1, "patch": status(1, 20.25)})
                await gw.until(lambda r: any(m["t"] == "applied" for m in r))
                assert names(gw.received) == {"a1"}
                a1 = await client.get(Device, "a1", namespace="plant")
                assert a1["status"]["twins"][0]["reported"]["value"] == "20.25"
            finally:
                await gw.close()
        finally:
            proc.terminate()
            await proc.wait()
            await client.close()


def test_cloud_run_refuses_a_bad_config_naming_the_key(tmp_path: Path, pki: Path) -> None:
    import yaml

    from tests.conftest import EDGETWIN

    config = {
        "listen": "127.0.0.1:0",
        "tls": {
            "cert_file": str(pki / "relay.pem"),
            "key_file": str(pki / "relay-key.pem"),
            "ca_file": "/nope.pem",
        },
    }
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    bad = subprocess.run(
        [EDGETWIN, "cloud", "run", "--config", str(tmp_path / "bad.yaml")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "tls.ca_file: /nope.pem does not exist" in bad.stderr
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "minStatusInterval": "soon"}))
    bad = subprocess.run(
        [EDGETWIN, "cloud", "run", "--config", str(tmp_path / "bad.yaml")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "minStatusInterval" in bad.stderr
