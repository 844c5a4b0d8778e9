"""First steps on a fresh install: --version, a default config path with an environment
override, the shipped files a deployment needs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import EDGETWIN

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "examples" / "gateway.yaml"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("EDGETWIN_CONFIG", "EDGETWIN_RELAY_CONFIG")}
    return subprocess.run(
        [EDGETWIN, *args], capture_output=True, text=True, timeout=30, env={**base, **(env or {})}
    )


def test_version_prints_the_installed_release() -> None:
    from edgetwin.runtime.version import __version__

    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"edgetwin {__version__}"
    assert __version__ != "0.0.0+unknown"


def test_config_defaults_to_the_system_path_and_the_environment_overrides_it() -> None:
    missing = cli("config", "check")
    assert missing.returncode == 2
    assert "/etc/edgetwin/gateway.yaml" in missing.stderr  # names the path it looked for
    found = cli("config", "check", env={"EDGETWIN_CONFIG": str(EXAMPLE)})
    assert found.returncode == 0, found.stderr
    assert "node edge-01" in found.stdout
    # --config still wins over the environment.
    explicit = cli("config", "check", "--config", str(EXAMPLE), env={"EDGETWIN_CONFIG": "/nonexistent.yaml"})
    assert explicit.returncode == 0, explicit.stderr
    relay = cli("cloud", "run", "--help", env={"EDGETWIN_RELAY_CONFIG": "/srv/relay.yaml"})
    assert relay.returncode == 0 and "/etc/edgetwin/relay.yaml" in relay.stdout


def test_the_example_config_checks_from_a_fresh_clone() -> None:
    out = cli("config", "check", "--config", str(EXAMPLE))
    assert out.returncode == 0, out.stderr


def test_license_is_shipped_and_declared_as_spdx() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def test_systemd_unit_gives_serial_and_bluetooth_access_and_a_watchdog() -> None:
    unit = (ROOT / "deploy" / "systemd" / "edgetwin-gateway.service").read_text()
    keys = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert {"dialout", "bluetooth"} <= set(keys["SupplementaryGroups"].split())
    assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main"
    # The watchdog must outlast the default stuck_after, or a healthy pause would kill it.
    from edgetwin.gateway.config import HealthConfig

    assert int(keys["WatchdogSec"]) * 1000 >= HealthConfig().stuck_after


def test_status_shows_health_devices_outbox_and_errors_in_one_screen(mosquitto: Any, tmp_path: Path) -> None:
    from tests.conftest import (
        THERMO_PROPS,
        GatewayProcess,
        device_doc,
        model_doc,
        publish,
        update_payload,
        write_config,
        write_manifests,
    )
    from tests.harness.processes import free_port

    node = "edge-status"
    manifests = write_manifests(
        tmp_path / "manifests" / "devices.yaml",
        [
            model_doc("thermostat", "plant", THERMO_PROPS),
            device_doc("thermo-1", "plant", "thermostat", node),
            device_doc("thermo-2", "plant", "thermostat", node),
        ],
    )
    health = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, node, mosquitto.port, manifests.parent, health={"listen": health})
    gw = GatewayProcess(config, mosquitto.port, node, tmp_path / "gateway.log").start()
    try:
        topic = "$hw/events/device/plant.thermo-1/twin/update"
        publish(mosquitto.port, topic, update_payload({"temperature": "21.5", "count": "x"}, "s1"))
        time.sleep(1.0)
        out = cli("status", "--config", str(config))
        assert out.returncode == 0, out.stdout + out.stderr
        text = out.stdout
        assert len(text.splitlines()) <= 24  # one screen
        assert "health   ok" in text
        assert "devices  2 served" in text
        assert "mqtt     connected" in text
        assert "1 rejected" in text  # "x" is not an INT
        doc = json.loads(cli("status", "--json", "--config", str(config)).stdout)
        assert doc["devices"]["served"] == 2 and doc["health"]["status"] == "ok"
        assert doc["metrics"]["edgetwin_gateway_reported_accepted_total"] >= 1
    finally:
        assert gw.stop() == 0
    down = cli("status", "--config", str(config))
    assert down.returncode == 1 and "NOT ANSWERING" in down.stdout


def test_config_check_refuses_what_gateway_run_would_fail_on(tmp_path: Path) -> None:
    """Each names the key and what is wrong, exit status 2."""
    manifests = tmp_path / "m"
    manifests.mkdir()
    (manifests / "t.yaml").write_text(
        (ROOT / "deploy" / "examples" / "manifests" / "thermostat.yaml").read_text()
    )
    (tmp_path / "folder").mkdir()
    (tmp_path / "text.db").write_text("not a database")
    (tmp_path / "x.pem").write_text("x")
    base = "node: edge-01\nmanifests: [m]\n"
    cases = {
        "store.path: " + str(tmp_path / "folder") + " is a folder": (
            base + 'store: {path: folder}\nmqtt: {url: "mqtt://127.0.0.1:1883"}\n'
        ),
        "is not an SQLite database": base + 'store: {path: text.db}\nmqtt: {url: "mqtt://127.0.0.1:1883"}\n',
        "key 'node' given twice (lines 1 and 4)": (
            base + 'store: {path: s.db}\nnode: edge-02\nmqtt: {url: "mqtt://127.0.0.1:1883"}\n'
        ),
        "mqtt.url: give the port, e.g. mqtt://broker:1883": base
        + 'store: {path: s.db}\nmqtt: {url: "mqtt://broker"}\n',
        "uplink.address: expected HOST:PORT with the port given": (
            base
            + 'store: {path: s.db}\nmqtt: {url: "mqtt://127.0.0.1:1883"}\n'
            + "uplink: {address: relay.example, ca_file: x.pem, cert_file: x.pem, key_file: x.pem}\n"
        ),
    }
    for expected, text in cases.items():
        (tmp_path / "gw.yaml").write_text(text)
        out = cli("config", "check", "--config", str(tmp_path / "gw.yaml"))
        assert out.returncode == 2 and expected in out.stderr, (expected, out.stderr)
        assert "Traceback" not in out.stderr
    # A manifest with a key given twice: no silent "last one wins".
    (manifests / "dup.yaml").write_text(
        "apiVersion: edgetwin.io/v1alpha1\nkind: Device\nmetadata: {name: d, namespace: plant}\n"
        "spec: {nodeName: edge-01}\nspec: {nodeName: edge-02}\n"
    )
    (tmp_path / "gw.yaml").write_text(base + 'store: {path: s.db}\nmqtt: {url: "mqtt://127.0.0.1:1883"}\n')
    out = cli("config", "check", "--config", str(tmp_path / "gw.yaml"))
    assert (
        out.returncode == 2
        and "dup.yaml: not valid YAML: key 'spec' given twice (lines 4 and 5)" in out.stderr
    )


def test_every_command_has_a_description_and_every_option_help_with_its_default() -> None:
    import argparse

    from edgetwin.cli import build_parser

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if not sub.description:
                        missing.append(f"{path} {name}: no description")
                    walk(sub, f"{path} {name}")
            elif action.dest != "help" and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}: no help")

    walk(build_parser(), "edgetwin")
    assert missing == []
    # Defaults are shown: what a user would otherwise have to guess.
    out = cli("sim", "modbus", "--help").stdout
    assert "(default: 5020)" in out and "(default: 127.0.0.1)" in out and "(default: 1)" in out
    out = cli("demo", "--help").stdout
    assert "cuts the link" in out and "(default: 12.0)" in out
    assert "a free one) (default: 0)" in " ".join(out.split())  # 0 is shown, not taken for False
