"""Which definition of each device the gateway serves (gateway/registry.py): the rule
docs/crds.md states ("Where devices come from"), case by case and as a property of any
sequence of cluster and manifest changes (hypothesis)."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edgetwin.deviceapi import Device, DeviceModel
from edgetwin.gateway.registry import Decision, Registry
from tests.conftest import device_doc, model_doc

NODE = "edge-01"
PROPS = [{"name": "t", "type": "FLOAT"}, {"name": "n", "type": "INT"}]


def cluster_device(name: str, generation: int = 1, **spec: Any) -> dict[str, Any]:
    doc = device_doc(name, "plant", "m", NODE, protocol={"protocolName": "virtual"})
    doc["spec"].update(spec)
    doc["metadata"].update(generation=generation, resourceVersion=str(generation * 10))
    return doc


def cluster_model(props: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    doc = model_doc("m", "plant", props or PROPS)
    doc["metadata"]["resourceVersion"] = "1"
    return doc


def check(device: Device, _model: DeviceModel) -> tuple[str, str] | None:
    """A mapper's check: a visitor config with ``bad`` set is refused."""
    for i, prop in enumerate(device.spec.properties):
        if prop.visitors is not None and prop.visitors.configData.get("bad"):
            return "InvalidConfig", f"spec.properties[{i}].visitors.configData.bad: refused"
    return None


def manifest(name: str) -> Device:
    return Device.model_validate(device_doc(name, "plant", "m", NODE, protocol={"protocolName": "virtual"}))


MODEL = DeviceModel.model_validate(model_doc("m", "plant", PROPS))


def registry_with(manifests: list[str] = ()) -> Registry:  # type: ignore[assignment]
    reg = Registry(NODE, check)
    reg.set_manifests([manifest(n) for n in manifests], [MODEL])
    reg.decide()
    return reg


def test_the_cluster_definition_wins_over_the_manifest_and_says_so() -> None:
    reg = registry_with(["a"])
    assert reg.served["plant.a"].source == "manifest"
    reg.upsert("DeviceModel", cluster_model())
    d = reg.upsert("Device", cluster_device("a"))
    assert [x.source for x in d.serve] == ["cluster"]
    assert any("local manifest" in e[2]["message"] for e in d.events)
    # Deleted in the cluster: back to the manifest.
    d = reg.delete("Device", "plant", "a")
    assert [x.source for x in d.serve] == ["manifest"] and not d.remove


def test_an_invalid_cluster_update_keeps_the_previous_generation_in_service() -> None:
    reg = registry_with()
    reg.upsert("DeviceModel", cluster_model())
    reg.upsert("Device", cluster_device("a", 1))
    bad = cluster_device("a", 2, properties=[{"name": "t", "visitors": {"configData": {"bad": True}}}])
    d = reg.upsert("Device", bad)
    assert not d.serve and not d.remove
    assert reg.served["plant.a"].generation == 1
    ready = d.readiness["plant.a"]
    assert not ready.ready and ready.reason == "InvalidConfig"
    assert "spec.properties[0].visitors.configData.bad" in ready.message
    assert "still served with the previous cluster generation 1" in ready.message
    assert d.observed == {"plant.a": 2}  # the generation seen, even though not served


def test_a_device_with_nothing_valid_is_declared_but_not_served() -> None:
    reg = registry_with()
    d = reg.upsert("Device", cluster_device("a"))  # no DeviceModel yet
    assert "plant.a" not in reg.served and d.unserved == {"plant.a": ("plant", "a")}
    assert d.readiness["plant.a"].reason == "ModelNotFound"
    assert "spec.deviceModelRef.name" in d.readiness["plant.a"].message
    d = reg.upsert("DeviceModel", cluster_model())  # the model arrives: served now
    assert [x.id for x in d.serve] == ["plant.a"] and d.readiness["plant.a"].ready


def test_a_model_change_reconfigures_every_device_using_it() -> None:
    reg = registry_with()
    reg.upsert("DeviceModel", cluster_model())
    for name in ("a", "b"):
        reg.upsert("Device", cluster_device(name))
    d = reg.upsert("DeviceModel", cluster_model([*PROPS, {"name": "extra", "type": "STRING"}]))
    assert sorted(x.id for x in d.serve) == ["plant.a", "plant.b"]
    assert all(x.model.get_property("extra") is not None for x in d.serve)


def test_another_nodes_device_and_a_relist_without_a_device() -> None:
    reg = registry_with()
    reg.upsert("DeviceModel", cluster_model())
    other = cluster_device("x")
    other["spec"]["nodeName"] = "edge-02"
    d = reg.upsert("Device", other)
    assert d.readiness["plant.x"].reason == "OtherNode" and "plant.x" not in reg.served
    reg.upsert("Device", cluster_device("a"))
    d = reg.synced("Device", ["plant/x"])  # a relist: a is gone
    assert d.remove == ["plant.a"] and "plant.a" not in reg.served


# --------------------------------------------------------------------- any sequence
NAMES = ("a", "b", "c")


class RegistryMachine(RuleBasedStateMachine):
    """Random cluster and manifest changes; after each, the served set follows the rule,
    and the decisions, applied to a mirror as the gateway applies them (start or
    reconfigure, stop), reproduce exactly what is served."""

    def __init__(self) -> None:
        super().__init__()
        self.reg = Registry(NODE, check)
        self.manifests: set[str] = set()
        self.cluster: dict[str, dict[str, Any]] = {}  # name -> Device doc
        self.model: dict[str, Any] | None = None
        self.last_valid: dict[str, int] = {}  # name -> generation of its last valid cluster def
        self.mirror: dict[str, tuple[str, int]] = {}  # what the mappers serve: id -> (source, gen)
        self.generation = 0
        self._apply(self.reg.decide())

    def _apply(self, d: Decision) -> None:
        for dev_id in d.remove:
            self.mirror.pop(dev_id, None)
        for definition in d.serve:
            self.mirror[definition.id] = (definition.source, definition.generation)

    def _valid(self, doc: dict[str, Any]) -> bool:
        props = doc["spec"].get("properties") or []
        return self.model is not None and not any(p.get("visitors") for p in props)

    @rule(name=st.sampled_from(NAMES), bad=st.booleans())
    def upsert_device(self, name: str, bad: bool) -> None:
        self.generation += 1
        props = [{"name": "t", "visitors": {"configData": {"bad": True}}}] if bad else []
        doc = (
            cluster_device(name, self.generation, properties=props)
            if props
            else cluster_device(name, self.generation)
        )
        self.cluster[name] = doc
        self._apply(self.reg.upsert("Device", copy.deepcopy(doc)))
        if self._valid(doc):
            self.last_valid[name] = self.generation

    @precondition(lambda self: bool(self.cluster))
    @rule(data=st.data())
    def delete_device(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.cluster)))
        del self.cluster[name]
        self.last_valid.pop(name, None)
        self._apply(self.reg.delete("Device", "plant", name))

    @rule()
    def upsert_model(self) -> None:
        self.model = cluster_model()
        self._apply(self.reg.upsert("DeviceModel", cluster_model()))
        for name, doc in self.cluster.items():
            if self._valid(doc):
                self.last_valid[name] = doc["metadata"]["generation"]

    @rule()
    def delete_model(self) -> None:
        self.model = None
        self._apply(self.reg.delete("DeviceModel", "plant", "m"))

    @rule(names=st.sets(st.sampled_from(NAMES)))
    def set_manifests(self, names: set[str]) -> None:
        self.manifests = names
        self.reg.set_manifests([manifest(n) for n in names], [MODEL])
        self._apply(self.reg.decide())

    @invariant()
    def serves_by_the_rule(self) -> None:
        for name in NAMES:
            dev_id = f"plant.{name}"
            served = self.reg.served.get(dev_id)
            doc = self.cluster.get(name)
            if doc is not None and self._valid(doc):
                # 1. a valid cluster definition is served, at its generation
                assert served is not None and (served.source, served.generation) == (
                    "cluster",
                    doc["metadata"]["generation"],
                )
                assert self.reg.readiness[dev_id].ready
            elif doc is not None:
                # 3. invalid: not Ready; served with the previous definition or nothing
                assert not self.reg.readiness[dev_id].ready
                if served is not None and served.source == "cluster":
                    assert served.generation == self.last_valid.get(name, served.generation)
            elif name in self.manifests:
                assert served is not None and served.source == "manifest"  # 2. and 4.
            else:
                assert served is None  # 4. deleted, nothing to fall back on
        assert self.mirror == {k: (v.source, v.generation) for k, v in self.reg.served.items()}


RegistryMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
test_registry_follows_the_rule_for_any_sequence = RegistryMachine.TestCase
