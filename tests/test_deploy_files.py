"""Shipped files stay true to the code: CRDs, example config and manifests."""

from __future__ import annotations

from pathlib import Path

import yaml

from deviceapi import AccessMode, PropertyType
from gateway.config import parse_config
from gateway.manifests import load_manifests

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
    from gateway.mapper_host import validate_devices

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
    from cloud.config import load_relay_config
    from edgetwin.stack import make_pki

    pki = make_pki(tmp_path / "pki", "edge-01")
    cfg = yaml.safe_load(config_map["data"]["relay.yaml"])
    for key in ("cert_file", "key_file", "ca_file"):
        name = Path(cfg["tls"][key]).name
        (tmp_path / name).write_bytes((pki / name).read_bytes())
        cfg["tls"][key] = name
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_relay_config(tmp_path / "relay.yaml")
    assert loaded.minStatusInterval == 5000 and loaded.kubeconfig is None
