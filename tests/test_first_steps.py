"""First steps on a fresh install: --version, a default config path with an environment
override, the shipped files a deployment needs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import EDGETWIN

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "examples" / "gateway.yaml"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("EDGETWIN_CONFIG", "EDGETWIN_RELAY_CONFIG")}
    return subprocess.run(
        [EDGETWIN, *args], capture_output=True, text=True, timeout=30, env={**base, **(env or {})}
    )


def test_version_prints_the_installed_release() -> None:
    from deviceapi.version import __version__

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


def test_systemd_unit_gives_serial_and_bluetooth_access() -> None:
    unit = (ROOT / "deploy" / "systemd" / "edgetwin-gateway.service").read_text()
    groups = next(line for line in unit.splitlines() if line.startswith("SupplementaryGroups="))
    assert {"dialout", "bluetooth"} <= set(groups.split("=", 1)[1].split())
