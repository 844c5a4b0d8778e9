"""MQTT over TLS (``mqtts://``), against a real mosquitto with TLS listeners: the gateway
and ``edgetwin twin set`` take the same ``mqtt.tls`` settings, including none (the
system's trusted CAs) and ``insecure`` (no host name check), and a client certificate
the broker requires. A ``twin set`` that ignored them spoke plaintext to a TLS port."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EDGETWIN, THERMO_PROPS, GatewayProcess, device_doc, model_doc, write_manifests
from tests.harness.processes import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[3]
NODE = "edge-tls"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    subprocess.run([str(ROOT / "deploy" / "pki" / "make-test-pki"), str(out), NODE], check=True)
    return out


class TlsBroker:
    """A mosquitto with a plain listener (for the test's own observers) and three TLS
    listeners: one requiring a client certificate, one not, and one on 127.0.0.2, an
    address its certificate does not name."""

    def __init__(self, workdir: Path, pki: Path) -> None:
        self.mutual, self.server_only, self.unnamed = free_port(), free_port(), free_port()
        certs = f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'relay.pem'}\nkeyfile {pki / 'relay-key.pem'}\n"
        extra = (
            # Started as root, mosquitto drops to its own user, who cannot read pytest's
            # private temp folders; as anyone else this line changes nothing.
            "user root\n"
            f"listener {self.mutual} 127.0.0.1\n{certs}require_certificate true\n"
            f"listener {self.server_only} 127.0.0.1\n{certs}"
            f"listener {self.unnamed} 127.0.0.2\n{certs}"
        )
        self.broker = Mosquitto(workdir, extra)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[TlsBroker]:
    b = TlsBroker(tmp_path_factory.mktemp("mosquitto-tls"), pki)
    yield b
    b.broker.stop()


def _config(tmp: Path, url: str, tls: dict[str, Any] | None) -> Path:
    manifests = write_manifests(
        tmp / "manifests" / "m.yaml",
        [
            model_doc("thermostat", "plant", THERMO_PROPS),
            device_doc("thermo-1", "plant", "thermostat", NODE),
        ],
    )
    mqtt: dict[str, Any] = {"url": url}
    if tls is not None:
        mqtt["tls"] = tls
    cfg = {
        "node": NODE,
        "store": {"path": str(tmp / "store.db")},
        "mqtt": mqtt,
        "manifests": [str(manifests)],
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("case", ["client certificate", "system CAs", "insecure"])
def test_twin_set_reaches_a_gateway_over_mqtts_with_the_configs_tls(
    broker: TlsBroker, pki: Path, tmp_path: Path, case: str
) -> None:
    env = dict(os.environ)
    if case == "client certificate":
        url = f"mqtts://localhost:{broker.mutual}"
        tls: dict[str, Any] | None = {
            "ca_file": str(pki / "ca.pem"),
            "cert_file": str(pki / f"{NODE}.pem"),
            "key_file": str(pki / f"{NODE}-key.pem"),
        }
    elif case == "system CAs":
        # No tls block: mqtts:// verifies against the system's CAs, which OpenSSL reads from
        # SSL_CERT_FILE when set (here: the test CA stands in for the system's).
        url, tls = f"mqtts://localhost:{broker.server_only}", None
        env["SSL_CERT_FILE"] = str(pki / "ca.pem")
    else:
        url, tls = f"mqtts://127.0.0.2:{broker.unnamed}", {"ca_file": str(pki / "ca.pem"), "insecure": True}
    config = _config(tmp_path, url, tls)
    gw = GatewayProcess(config, broker.broker.port, NODE, tmp_path / "gateway.log")
    gw.proc = subprocess.Popen(
        [EDGETWIN, "gateway", "run", "--config", str(config)],
        stdout=(tmp_path / "gateway.log").open("ab"),
        stderr=subprocess.STDOUT,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    try:
        gw.wait_ready()  # its retained "online", seen on the plain listener: it is on TLS
        out = subprocess.run(
            [EDGETWIN, "twin", "set", "plant/thermo-1", "setpoint=21.5", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        assert "setpoint" in out.stdout and "21.5" in out.stdout
    finally:
        gw.stop()


def test_twin_set_names_a_tls_failure(broker: TlsBroker, pki: Path, tmp_path: Path) -> None:
    """Without the client certificate the broker requires: a one-line error naming the
    broker, exit 1, no traceback."""
    config = _config(tmp_path, f"mqtts://localhost:{broker.mutual}", {"ca_file": str(pki / "ca.pem")})
    out = subprocess.run(
        [
            EDGETWIN,
            "twin",
            "set",
            "plant/thermo-1",
            "setpoint=21.5",
            "--config",
            str(config),
            "--timeout",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert f"cannot reach the MQTT broker at localhost:{broker.mutual}" in out.stderr
    assert "Traceback" not in out.stderr
