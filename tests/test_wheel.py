"""The wheel as a user installs it: built from this checkout, installed into a fresh
virtual environment (its dependencies taken from the dev venv, so nothing is fetched),
it gives the ``edgetwin`` command, ``import edgetwin.gateway`` from the top-level
gateway/ folder's code, the mapper entry points, the shipped files, and nothing of the
tests or the chaos harness."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEV_PY = ROOT / ".venv" / "bin" / "python"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(the fresh venv, the wheel's file names)."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            str(DEV_PY),
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    wheel = next(tmp.glob("edgetwin-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = subprocess.run(
        [str(DEV_PY), "-c", "import grpc, os; print(os.path.dirname(os.path.dirname(grpc.__file__)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (site / "deps.pth").write_text(deps + "\n")  # the dependencies; edgetwin comes from the wheel
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return venv, zipfile.ZipFile(wheel).namelist()


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(venv)}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, env=env, cwd=venv)


def test_the_wheel_holds_the_product_and_the_stand_ins_but_no_tests(
    installed: tuple[Path, list[str]],
) -> None:
    _, names = installed
    # One import namespace: nothing but edgetwin/ and its dist-info at the top level.
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"edgetwin"}
    for sub in (
        "gateway/service.py",
        "gateway/twin/engine.py",
        "mappers/sdk.py",
        "cloud/relay.py",
        "deviceapi/types.py",
        "runtime/aio.py",
        "sync/wire.py",
        "sync/v1/sync_pb2.py",
        "simulators/kube/emulator.py",
        "simulators/demo_manifests/plant.yaml",
        "deploy/crds/devices.edgetwin.io.yaml",
        "deploy/examples/manifests/thermostat.yaml",
        "deploy/pki/make-test-pki",
    ):
        assert f"edgetwin/{sub}" in names, sub
    assert not [n for n in names if "chaos" in n or "/tests/" in n or "harness" in n or "conftest" in n]
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_the_installed_command_imports_the_packaged_code(installed: tuple[Path, list[str]]) -> None:
    venv, _ = installed
    version = _run(venv, "edgetwin", "--version")
    assert version.returncode == 0 and version.stdout.startswith("edgetwin "), version.stderr
    code = (
        "import edgetwin.gateway.service as s, edgetwin.cloud.relay, sys; "
        "assert s.__file__.startswith(sys.argv[1]), s.__file__; print(s.__file__)"
    )
    site = str(next((venv / "lib").glob("python*/site-packages")))
    out = _run(venv, str(venv / "bin" / "python"), "-c", code, site)
    assert out.returncode == 0, out.stderr
    for args in (["cloud", "run", "--help"], ["gateway", "run", "--help"]):
        out = _run(venv, "edgetwin", *args)
        assert out.returncode == 0 and "--config" in out.stdout, out.stderr


def test_the_mapper_entry_points_load_from_the_wheel(installed: tuple[Path, list[str]]) -> None:
    venv, _ = installed
    code = (
        "from importlib.metadata import entry_points; "
        "print(sorted(f'{e.name}={e.load().__module__}' for e in entry_points(group='edgetwin.mappers')))"
    )
    out = _run(venv, str(venv / "bin" / "python"), "-c", code)
    assert out.returncode == 0, out.stderr
    assert "ble=edgetwin.mappers.ble.mapper" in out.stdout
    assert "modbus=edgetwin.mappers.modbus.mapper" in out.stdout
    assert "virtual=edgetwin.mappers.virtual" in out.stdout


def test_the_crds_come_with_the_wheel(installed: tuple[Path, list[str]]) -> None:
    """``edgetwin cloud crds | kubectl apply -f -`` needs no checkout."""
    venv, _ = installed
    out = _run(venv, "edgetwin", "cloud", "crds")
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert sorted(d["metadata"]["name"] for d in docs) == sorted(
        yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "deploy" / "crds").glob("*.yaml")
    )


def test_the_default_install_is_every_role_and_each_role_lists_its_own() -> None:
    """The default install runs every role and the demo (the union of the role lists);
    the relay's list, which its image installs, has no Bluetooth, Modbus or MQTT library
    (scripts/image test checks the built image too)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    roles = set(extras["relay"]) | set(extras["gateway"]) | set(extras["emulator"])
    assert set(project["dependencies"]) == roles

    def names(reqs: list[str]) -> set[str]:
        return {r.split(">")[0].split("<")[0].split("[")[0].split("=")[0].lower() for r in reqs}

    assert not names(extras["relay"]) & {
        "bleak",
        "bumble",
        "pymodbus",
        "amqtt",
        "paho-mqtt",
        "aiomqtt",
        "mqtt5",
    }
    assert {"lightkube", "grpcio"} <= names(extras["relay"])
    assert {"bleak", "pymodbus", "aiomqtt"} <= names(extras["gateway"])
    assert "lightkube" not in names(extras["gateway"])
