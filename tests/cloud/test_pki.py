"""The test PKI script makes certificates that gRPC mutual TLS accepts, and the server
learns the node from the client certificate (what the relay relies on)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edgetwin.sync.v1 import sync_pb2, sync_pb2_grpc
from tests.harness.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "pki" / "make-test-pki"


class Echo(sync_pb2_grpc.SyncServicer):
    """Answers each stream with one frame naming the peer's certificate CN."""

    async def Link(
        self, request_iterator: AsyncIterator[sync_pb2.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[sync_pb2.Frame]:  # type: ignore[override]
        cn = context.auth_context().get("x509_common_name", [b""])[0]
        async for _ in request_iterator:
            yield sync_pb2.Frame(seq=1, payload=cn)
            return


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    subprocess.run([str(SCRIPT), str(out), "edge-a", "edge-b"], check=True, capture_output=True)
    return out


def test_the_script_refuses_bad_node_names(tmp_path: Path) -> None:
    r = subprocess.run([str(SCRIPT), str(tmp_path), "Edge_A"], capture_output=True, text=True)
    assert r.returncode == 2 and "not a valid node name: Edge_A" in r.stderr


async def test_mutual_tls_names_the_node_and_refuses_strangers(pki: Path) -> None:
    server = grpc.aio.server()
    sync_pb2_grpc.add_SyncServicer_to_server(Echo(), server)
    creds = grpc.ssl_server_credentials(
        [((pki / "relay-key.pem").read_bytes(), (pki / "relay.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = free_port()
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    await server.start()

    async def node_seen(node: str | None) -> str:
        client_creds = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.pem").read_bytes(),
            private_key=(pki / f"{node}-key.pem").read_bytes() if node else None,
            certificate_chain=(pki / f"{node}.pem").read_bytes() if node else None,
        )
        async with grpc.aio.secure_channel(f"localhost:{port}", client_creds) as channel:
            stub = sync_pb2_grpc.SyncStub(channel)
            call = stub.Link(iter([sync_pb2.Frame(seq=1)]))
            async for frame in call:
                return frame.payload.decode()
        return ""

    try:
        assert await node_seen("edge-a") == "edge-a"
        assert await node_seen("edge-b") == "edge-b"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node_seen(None)  # no client certificate
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
