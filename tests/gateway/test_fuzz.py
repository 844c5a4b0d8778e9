"""Fuzzing what peers send with hostile input (tests/harness/hostile.py: deep nesting, huge
numbers, huge strings, invalid UTF-8): MQTT payloads through the gateway's handler, sync
frames, cloud objects, edge status at the relay, and manifests. Each parser either
accepts or refuses with its own typed error naming the problem; nothing stops the
processing of other messages. `EDGETWIN_FUZZ=long` runs 10,000 examples each."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgetwin.cloud.status_merge import merge_edge_status
from edgetwin.deviceapi import ManifestError
from edgetwin.gateway.config import parse_config
from edgetwin.gateway.manifests import parse_object
from edgetwin.gateway.mqtt.bus import Inbound
from edgetwin.gateway.mqtt.payloads import (
    PayloadError,
    event_id_of,
    parse_state_update,
    parse_twin_get,
    parse_twin_update,
)
from edgetwin.gateway.registry import Registry
from edgetwin.gateway.service import Gateway
from edgetwin.gateway.store.writer import StoreWriter
from edgetwin.sync.wire import (
    EDGE_TO_CLOUD,
    ENCODING_MSGPACK,
    ENCODING_MSGPACK_ZSTREAM,
    FrameDecoder,
    FrameEncoder,
    WireError,
)
from tests.conftest import THERMO_PROPS, device_doc, model_doc
from tests.harness.hostile import examples, json_values, k8s_objects, mqtt_payloads, msgpack_values, names
from tests.harness.processes import free_port

SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


@settings(max_examples=examples(500), suppress_health_check=SLOW)
@given(mqtt_payloads)
@example(b"[" * 50_000)
@example(b'{"twin": {"p": {"actual": {"value": ' + b"9" * 5000 + b"}}}}")
@example(b'{"event_id": "\xff\xfe", "twin": {}}')
def test_mqtt_parsers_accept_or_explain(payload: bytes) -> None:
    for parse in (parse_twin_update, parse_twin_get, parse_state_update):
        try:
            parse(payload, 65536)
        except PayloadError as exc:
            assert exc.reason and exc.kind in {"not_json", "bad_shape", "oversize"}
    assert isinstance(event_id_of(payload), str)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("fuzz-gw")
    (tmp / "m.yaml").write_text(
        yaml.safe_dump_all(
            [
                model_doc("thermostat", "plant", THERMO_PROPS),
                device_doc("t1", "plant", "thermostat", "edge-f"),
            ]
        )
    )
    cfg = parse_config(
        {
            "node": "edge-f",
            "store": {"path": str(tmp / "s.db")},
            "mqtt": {"embedded": {"port": free_port()}},
            "manifests": [str(tmp / "m.yaml")],
        }
    )
    gw = Gateway(cfg)
    gw.load()
    assert gw.store is not None
    gw.writer = StoreWriter(gw.store)
    yield gw
    gw.writer.close()
    gw.store.close()


TOPICS = st.one_of(
    st.sampled_from(
        [
            "$hw/events/device/plant.t1/twin/update",
            "$hw/events/device/plant.t1/twin/get",
            "$hw/events/device/plant.t1/state/update",
            "$hw/events/node/edge-f/membership/get",
            "$SYS/broker/publish/messages/dropped",
        ]
    ),
    names.map(lambda n: f"$hw/events/device/{n}/twin/update"),
    st.text(max_size=30),
)


@settings(max_examples=examples(400), suppress_health_check=[*SLOW, HealthCheck.function_scoped_fixture])
@given(TOPICS, mqtt_payloads, st.booleans())
def test_the_gateway_answers_and_acknowledges_whatever_arrives(
    gateway: Gateway, topic: str, payload: bytes, dup: bool
) -> None:
    """The whole handler, not only the parser: it never raises, and every message is
    acknowledged exactly once (so the broker never redelivers it as a poison message)."""
    gateway.release.acks.clear()
    gateway.release.pubs.clear()
    msg = Inbound(topic, payload, 1, mid=1, generation=0, dup=dup)
    gateway.inbound.on_message(msg)
    assert [m for m in gateway.release.acks if m is msg] == [
        msg
    ] or topic == "$SYS/broker/publish/messages/dropped"
    assert all(len(body) <= 70_000 + 1024 for _, body, *_ in gateway.release.pubs)  # answers stay bounded


async def test_after_the_storm_the_gateway_still_takes_a_valid_update(gateway: Gateway) -> None:
    gateway.release.acks.clear()
    gateway.release.pubs.clear()
    body = json.dumps({"event_id": "after", "twin": {"count": {"actual": {"value": 41}}}}).encode()
    before = gateway.engine.devices["plant.t1"].properties["count"].last_version
    gateway.inbound.on_message(Inbound("$hw/events/device/plant.t1/twin/update", body, 1, 1, 0))
    await gateway._commit_once()
    prop = gateway.engine.devices["plant.t1"].properties["count"]
    assert prop.reported is not None and prop.reported.value == 41 and prop.last_version == before + 1
    await asyncio.sleep(0)


# --------------------------------------------------------------------- sync frames
@settings(max_examples=examples(400), suppress_health_check=SLOW)
@given(
    st.one_of(
        st.binary(max_size=500),
        msgpack_values.map(lambda v: msgpack.packb([v], use_bin_type=True)),
        st.lists(msgpack_values, max_size=3).map(lambda v: msgpack.packb(v, use_bin_type=True)),
        st.integers(1_000, 100_000).map(lambda n: b"\x91" * n + b"\x90"),  # arrays nested deep
        st.integers(1_000, 100_000).map(lambda n: b"\x81\xa1a" * n + b"\xc0"),  # maps nested deep
        st.builds(
            lambda dev, rev, patch: msgpack.packb(
                [{"t": "status", "dev": dev, "rev": rev, "patch": patch}], use_bin_type=True
            ),
            names,
            st.integers(-(2**63), 2**63 - 1),
            msgpack_values,
        ),
    ),
    st.sampled_from([ENCODING_MSGPACK, ENCODING_MSGPACK_ZSTREAM]),
)
@example(b"\x91" * 200_000 + b"\x90", ENCODING_MSGPACK)
def test_sync_frames_decode_or_raise_wire_error(raw: bytes, encoding: int) -> None:
    payload = raw if encoding == ENCODING_MSGPACK else FrameEncoder().encode(raw)[1]
    try:
        messages = FrameDecoder().decode(encoding, payload, EDGE_TO_CLOUD)
    except WireError as exc:
        assert str(exc)
        return
    assert all(isinstance(m, dict) and m["t"] in EDGE_TO_CLOUD for m in messages)


# --------------------------------------------------------------------- the relay's status rule
@settings(max_examples=examples(500), suppress_health_check=SLOW)
@given(
    json_values | st.dictionaries(st.text(max_size=8), json_values), json_values | st.none(), st.integers()
)
@example({"twins": {"p": None}, "conditions": {"X": 5}, "state": None}, None, 3)
@example({"twins": {"p": {"reported": {"metadata": {"version": "9" * 5000}}}}}, {"twins": [5]}, 1)
def test_the_relay_applies_any_patch_a_gateway_sends_without_raising(
    patch: Any, status: Any, rev: int
) -> None:
    """A gateway is a peer: whatever its status message holds, the rule either takes it or
    ignores the parts that do not fit; it never raises (which would retry a poison write
    for ever), and the result is still a status object."""
    if not isinstance(patch, dict):
        patch = {"twins": patch}
    result = merge_edge_status(status if isinstance(status, dict) else None, patch, rev)
    assert isinstance(result, dict)
    json.dumps(result)  # something the API server can be sent


# --------------------------------------------------------------------- cloud objects
@settings(max_examples=examples(400), suppress_health_check=SLOW)
@given(st.lists(st.tuples(st.sampled_from(["Device", "DeviceModel"]), st.data()), min_size=1, max_size=4))
def test_cloud_objects_are_served_or_reported_never_raise(items: list[tuple[str, Any]]) -> None:
    registry = Registry("edge-f", check=lambda d, m: None)
    for kind, data in items:
        obj = data.draw(k8s_objects(kind))
        if not isinstance(obj, dict):
            continue
        decision = registry.upsert(kind, obj)
        for dev_id, readiness in decision.readiness.items():
            assert readiness.ready or readiness.message, dev_id
    registry.synced("Device", [])
    assert not registry.served or all(d.source == "manifest" for d in registry.served.values())


@settings(max_examples=examples(300), suppress_health_check=[*SLOW, HealthCheck.function_scoped_fixture])
@given(k8s_objects("Device"))
def test_the_gateway_takes_any_cloud_object_without_raising(gateway: Gateway, obj: dict[str, Any]) -> None:
    """Upserts from the relay through the gateway's device lifecycle (registry, engine,
    adoption of the cloud's status): served, reported not ready, or ignored."""
    if isinstance(obj.get("metadata"), dict):
        obj["metadata"]["namespace"] = "plant"
    gateway.devices.on_cloud({"t": "upsert", "kind": "Device", "obj": obj})
    gateway.engine.drain()
    gateway.devices.take_rows()


# --------------------------------------------------------------------- manifests
@settings(max_examples=examples(400), suppress_health_check=SLOW)
@given(st.one_of(json_values, k8s_objects("Device"), k8s_objects("DeviceModel")))
def test_manifest_documents_parse_or_name_the_problem(doc: Any) -> None:
    try:
        parse_object(doc, "fuzz.yaml[0]")
    except ManifestError as exc:
        assert exc.where.startswith("fuzz.yaml[0]") and exc.problem


def test_a_manifest_file_of_garbage_names_the_file(tmp_path: Path) -> None:
    from edgetwin.gateway.manifests import load_manifests

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage: [\n")
    with pytest.raises(ManifestError, match=r"bad\.yaml"):
        load_manifests([bad], "edge-f")
