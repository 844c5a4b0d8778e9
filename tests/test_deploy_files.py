"""Shipped files stay true to the code: CRDs, example config and manifests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from edgetwin.deviceapi import AccessMode, PropertyType
from edgetwin.gateway.config import parse_config
from edgetwin.gateway.manifests import load_manifests

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _crd(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "crds" / name).read_text())


def test_crd_enums_match_the_python_types() -> None:
    model = _crd("devicemodels.edgetwin.io.yaml")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    item = model["properties"]["spec"]["properties"]["properties"]["items"]["properties"]
    assert set(item["type"]["enum"]) == {t.value for t in PropertyType}
    assert set(item["accessMode"]["enum"]) == {m.value for m in AccessMode}


def test_device_crd_has_status_subresource_columns_and_node_selector() -> None:
    version = _crd("devices.edgetwin.io.yaml")["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Node"] == ".spec.nodeName" and columns["State"] == ".status.state"
    assert {"jsonPath": ".spec.nodeName"} in version["selectableFields"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    twin = status["twins"]["items"]["properties"]
    assert {"propertyName", "reported", "observedDesired"} <= set(twin)


def test_example_config_and_manifests_load(tmp_path: Path) -> None:
    data = yaml.safe_load((DEPLOY / "examples" / "gateway.yaml").read_text())
    data["manifests"] = [str(DEPLOY / "examples" / "manifests")]
    cfg = parse_config(data, "example")
    assert cfg.node == "edge-01"
    manifests = load_manifests(cfg.manifests, cfg.node)
    assert ("plant", "thermostat-hall") in manifests.devices


def test_modbus_doc_example_loads_and_validates(tmp_path: Path) -> None:
    from edgetwin.gateway.mapper_host import validate_devices

    text = (ROOT / "docs" / "mappers" / "modbus.md").read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]  # the power meter
    (tmp_path / "meter.yaml").write_text(example)
    manifests = load_manifests([tmp_path / "meter.yaml"], "edge-01")
    devices = [(d, manifests.model_for(d)) for d in manifests.devices.values()]
    assert len(devices) == 1
    assert validate_devices(devices) == []


def test_relay_rbac_is_least_privilege_and_the_config_loads(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "relay" / "rbac.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    grants = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert grants == {
        ("devices", "get"),
        ("devices", "list"),
        ("devices", "watch"),
        ("devicemodels", "get"),
        ("devicemodels", "list"),
        ("devicemodels", "watch"),
        ("devices/status", "get"),
        ("devices/status", "patch"),
        ("gateways", "get"),
        ("gateways", "list"),
        ("gateways", "create"),
        ("gateways/status", "patch"),
    }
    assert all(rule["apiGroups"] == ["edgetwin.io"] for rule in role["rules"])
    relay = list(yaml.safe_load_all((DEPLOY / "relay" / "relay.yaml").read_text()))
    config_map = next(d for d in relay if d["kind"] == "ConfigMap")
    deployment = next(d for d in relay if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "edgetwin-relay"
    # The shipped relay config is valid once its TLS files exist.
    from edgetwin.cloud.config import load_relay_config
    from edgetwin.simulators.stack import make_pki

    pki = make_pki(tmp_path / "pki", "edge-01")
    cfg = yaml.safe_load(config_map["data"]["relay.yaml"])
    for key in ("cert_file", "key_file", "ca_file"):
        name = Path(cfg["tls"][key]).name
        (tmp_path / name).write_bytes((pki / name).read_bytes())
        cfg["tls"][key] = name
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_relay_config(tmp_path / "relay.yaml")
    assert loaded.minStatusInterval == 5000 and loaded.kubeconfig is None


def test_kustomize_base_renders_the_relay_with_crds_rbac_pdb_and_probes() -> None:
    """`kubectl apply -k deploy/` as docs/operations.md gives it: the real kubectl's
    kustomize renders everything, the PDB covers the Deployment's pods, and the readiness
    probe asks the port the relay serves gRPC health on."""
    kubectl = ROOT / ".venv" / "bin" / "kubectl"
    out = subprocess.run([str(kubectl), "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Service"]
        + ["Deployment", "PodDisruptionBudget"]
        + ["CustomResourceDefinition"] * 3
    )
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    container = pod["spec"]["containers"][0]
    assert container["image"].endswith(":0.2.0")
    relay_cfg = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["relay.yaml"])
    assert container["readinessProbe"]["grpc"]["port"] == int(relay_cfg["healthListen"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(relay_cfg["metricsListen"].rsplit(":", 1)[1])


def test_containerfile_is_multi_stage_pinned_and_non_root() -> None:
    text = (ROOT / "Containerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    froms = [line for line in lines if line.startswith("FROM")]
    assert len(froms) == 2 and " AS build" in froms[0]
    base = next(line for line in lines if line.startswith("ARG BASE="))
    assert re.fullmatch(r"ARG BASE=python:\d+\.\d+\.\d+-slim-\w+", base)  # an exact release
    user = next(line for line in lines if line.startswith("USER"))
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert lines[-2].startswith('ENTRYPOINT ["edgetwin"]')
    # Every folder pyproject.toml maps onto the package is copied into the build stage.
    import tomllib

    folders = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    )
    copied = {line.split()[1] for line in lines if line.startswith("COPY ") and len(line.split()) == 3}
    assert folders <= copied, sorted(folders - copied)


def test_grafana_dashboard_queries_only_metrics_the_code_exports() -> None:
    """A renamed metric must not leave a dashboard panel silently empty."""
    import json

    dash = json.loads((DEPLOY / "grafana" / "edgetwin.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    sources = "".join(
        (ROOT / f).read_text()
        for f in (
            "cloud/ops.py",
            "gateway/ops/prom.py",
            "gateway/service.py",
            "gateway/inbound.py",
            "gateway/mapper_side.py",
            "gateway/write_loop.py",
            "gateway/mqtt/bus.py",
        )
    )
    counters = set(re.findall(r'metrics\.inc\(\s*f?"([a-z_{}]+)"', sources))
    for expr in exprs:
        for name in re.findall(r"edgetwin_[a-z_]+", expr):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            if base.startswith("edgetwin_gateway_rejected_"):
                assert any(c.startswith("rejected_") for c in counters)
                continue
            short = base.removeprefix("edgetwin_gateway_").removeprefix("edgetwin_relay_")
            quoted = {f'"{name}"', f'"{base}"', f'"{short}"'}
            assert any(q in sources for q in quoted) or short in counters, name


def test_the_ble_example_is_what_the_emulator_serves() -> None:
    from edgetwin.gateway.config import load_config
    from edgetwin.simulators.ble import sensor_manifests

    folder = ROOT / "deploy" / "examples" / "ble"
    shipped = [d for d in yaml.safe_load_all((folder / "sensors.yaml").read_text()) if d]
    assert shipped == sensor_manifests("edge-01", count=2, beacons=1)
    cfg = load_config(folder / "gateway.yaml")
    assert cfg.node == "edge-01" and cfg.mappers["ble"]["hci"] == "tcp-client:127.0.0.1:9000"
