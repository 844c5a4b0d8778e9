"""A redelivered twin/update is answered again but not applied twice (gateway/dedup.py),
also after a restart between the commit and the acknowledgement."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml
from hypothesis import given
from hypothesis import strategies as st

from edgetwin.gateway.config import parse_config
from edgetwin.gateway.dedup import MAX_ANSWER_BYTES, RecentUpdates
from edgetwin.gateway.mqtt.bus import Inbound
from edgetwin.gateway.service import Gateway
from edgetwin.gateway.store.writer import StoreWriter
from tests.conftest import THERMO_PROPS, device_doc, model_doc
from tests.harness.processes import free_port


def test_the_rule() -> None:
    r = RecentUpdates(capacity=3, window_ms=1000)
    assert r.key("d", "", b"x") is None  # no event_id: never a duplicate
    k = r.key("d", "e1", b"payload")
    r.remember(k, b"answer", now_ms=0)
    assert r.lookup(k, 500, redelivered=False).answer == b"answer"  # type: ignore[union-attr]
    assert r.lookup(r.key("d", "e1", b"other payload"), 500, False) is None  # reused id, new content
    assert r.lookup(r.key("d2", "e1", b"payload"), 500, False) is None  # another device
    assert r.lookup(k, 5000, redelivered=False) is None  # a publisher repeating itself later
    assert r.lookup(k, 5000, redelivered=True) is not None  # the broker redelivering: any age
    for i in range(3):
        r.remember(r.key("d", f"n{i}", b"p"), b"a", 10)
    assert r.lookup(k, 20, redelivered=True) is None  # past the capacity
    r.remember(r.key("d", "big", b"p"), b"x" * (MAX_ANSWER_BYTES + 1), 30)
    assert r.lookup(r.key("d", "big", b"p"), 31, False).answer == b""  # type: ignore[union-attr]


@given(st.lists(st.tuples(st.sampled_from("abc"), st.binary(max_size=4)), max_size=60))
def test_memory_is_bounded_and_persisted_rows_restore_the_same_memory(items: list[tuple[str, bytes]]) -> None:
    r = RecentUpdates(capacity=5)
    persisted: dict[int, tuple[int, str, str, int, int, bytes]] = {}
    for i, (event, payload) in enumerate(items):
        r.remember(r.key("d", event, payload), b"a%d" % i, i)
        rows, floor = r.take_added()
        persisted.update({row[0]: row for row in rows})
        persisted = {seq: row for seq, row in persisted.items() if seq >= floor}
        assert len(r.entries) <= 5 and len(persisted) <= 5
    again = RecentUpdates(capacity=5)
    again.restore(sorted(persisted.values()))
    assert list(again.entries) == list(r.entries)


async def test_a_redelivery_after_a_restart_is_answered_from_the_store_and_not_applied(
    tmp_path: Path,
) -> None:
    (tmp_path / "m.yaml").write_text(
        yaml.safe_dump_all(
            [
                model_doc("thermostat", "plant", THERMO_PROPS),
                device_doc("t1", "plant", "thermostat", "edge-d"),
            ]
        )
    )
    cfg = parse_config(
        {
            "node": "edge-d",
            "store": {"path": str(tmp_path / "s.db")},
            "mqtt": {"embedded": {"port": free_port()}},
            "manifests": [str(tmp_path / "m.yaml")],
        }
    )
    topic = "$hw/events/device/plant.t1/twin/update"
    payload = json.dumps({"event_id": "once", "twin": {"count": {"actual": {"value": 5}}}}).encode()
    answers = []
    for restart in range(3):  # the first run applies; each restart sees a redelivery
        gw = Gateway(cfg)
        gw.load()
        assert gw.store is not None
        gw.writer = StoreWriter(gw.store)
        try:
            gw.inbound.on_message(Inbound(topic, payload, 1, mid=1, generation=0, dup=restart > 0))
            answers += [body for t, body, *_ in gw.release.pubs if t.endswith("/result")]
            await gw._commit_once()
            assert gw.engine.devices["plant.t1"].properties["count"].last_version == 1
        finally:
            gw.writer.close()
            gw.store.close()
    assert len(answers) == 3 and len(set(answers)) == 1
    assert json.loads(answers[0])["twin"]["count"]["metadata"]["version"] == 1
    await asyncio.sleep(0)
