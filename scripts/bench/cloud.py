"""The cloud side of a benchmark, as the product runs it: the Kubernetes API emulator
and a relay on it, each its own process, and the uplink config that reaches them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from edgetwin.deploy import DEPLOY
from scripts.bench.ingest import EDGETWIN, NODE
from tests.harness.processes import Proc, free_port, wait_port


class Cloud:
    """The Kubernetes API emulator, and a relay on it, as processes."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "cloud"
        self.dir.mkdir()
        pki = self.dir / "pki"
        subprocess.run(
            [str(DEPLOY / "pki" / "make-test-pki"), str(pki), NODE], check=True, capture_output=True
        )
        api_port, self.relay_port = free_port(), free_port()
        self.kubeconfig = kc = self.dir / "kubeconfig"
        self.api = Proc(
            [
                EDGETWIN,
                "cloud",
                "kube-emulator",
                "--port",
                str(api_port),
                "--kubeconfig",
                str(kc),
                "--namespace",
                "b",
            ],
            self.dir / "api.log",
        )
        self.api.start()
        wait_port(api_port)
        relay = {
            "listen": f"127.0.0.1:{self.relay_port}",
            "kubeconfig": str(kc),
            "tls": {
                "cert_file": str(pki / "relay.pem"),
                "key_file": str(pki / "relay-key.pem"),
                "ca_file": str(pki / "ca.pem"),
            },
            "log": {"level": "WARNING"},
        }
        (self.dir / "relay.yaml").write_text(yaml.safe_dump(relay))
        self.relay = Proc(
            [EDGETWIN, "cloud", "run", "--config", str(self.dir / "relay.yaml")], self.dir / "relay.log"
        )
        self.relay.start()
        wait_port(self.relay_port, 30)
        self.uplink = {
            "address": f"127.0.0.1:{self.relay_port}",
            "server_name": "localhost",
            "ca_file": str(pki / "ca.pem"),
            "cert_file": str(pki / f"{NODE}.pem"),
            "key_file": str(pki / f"{NODE}-key.pem"),
        }

    def add_devices(self, devices: int) -> None:
        """The node's Devices in the cluster, where their status goes (after the
        baselines: a gateway connected to a cluster holding them serves them all)."""
        docs = [
            {
                "apiVersion": "edgetwin.io/v1alpha1",
                "kind": "Device",
                "metadata": {"name": f"d{i}", "namespace": "b"},
                "spec": {"deviceModelRef": {"name": "m"}, "nodeName": NODE},
            }
            for i in range(devices)
        ]
        kubectl = Path(EDGETWIN).parent / "kubectl"
        manifest = self.dir / "devices.yaml"
        manifest.write_text(yaml.safe_dump_all(docs))
        subprocess.run(
            [str(kubectl), "--kubeconfig", str(self.kubeconfig), "apply", "-f", str(manifest)],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        self.relay.stop()
        self.api.stop()
