"""The twin engine's rules, with hypothesis where a rule is a property."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from edgetwin.deviceapi import Device, DeviceModel
from edgetwin.gateway.store.batch import snapshot
from edgetwin.gateway.store.writer import Store
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.twin.hlc import HybridClock, Stamp
from edgetwin.gateway.twin.model import (
    EVENT_REPEAT_MS,
    MAX_REJECTED_LISTED,
    DesiredRejected,
    UnknownDevice,
    WriteState,
)
from edgetwin.gateway.twin.writes import MAX_WRITE_ATTEMPTS, WritePolicy
from edgetwin.sync.patch import apply_patch
from tests.conftest import THERMO_PROPS, device_doc, model_doc

MODEL = DeviceModel.model_validate(model_doc("thermostat", "plant", THERMO_PROPS))
DEV_IDS = ["plant.t1", "plant.t2"]


def device(name: str = "t1", desired: dict[str, Any] | None = None) -> Device:
    props = [{"name": k, "desired": {"value": v}} for k, v in (desired or {}).items()]
    return Device.model_validate(device_doc(name, "plant", "thermostat", "edge-a", properties=props))


def engine_with(*names: str) -> TwinEngine:
    engine = TwinEngine()
    for name in names or ("t1",):
        engine.upsert_device(device(name), MODEL)
    engine.drain()
    return engine


# --------------------------------------------------------------------- reported
def test_reported_values_are_coerced_versioned_and_rejected_with_reasons() -> None:
    e = engine_with()
    out = e.apply_reported("plant.t1", {"temperature": "21.5", "count": "x", "nope": 1}, now_ms=1000)
    assert out.accepted["temperature"].value == 21.5 and out.accepted["temperature"].version == 1
    assert "expected an integer" in out.rejected["count"]
    assert "not a property" in out.rejected["nope"]
    changes = e.drain()
    assert {ev.kind for ev in changes.events} == {"rejected"}
    assert e.devices["plant.t1"].properties["count"].last_version == 0
    out = e.apply_reported("plant.t1", {"temperature": 22}, now_ms=2000, timestamp_ms=1500)
    assert out.accepted["temperature"].version == 2
    assert out.accepted["temperature"].timestamp == 1500


def test_unknown_device() -> None:
    with pytest.raises(UnknownDevice, match=r"plant\.zz"):
        engine_with().apply_reported("plant.zz", {"count": 1}, 0)


# --------------------------------------------------------------------- desired / conflicts
def test_desired_rejections_name_the_reason() -> None:
    e = engine_with()
    with pytest.raises(DesiredRejected, match="ReadOnly"):
        e.apply_desired("plant.t1", "temperature", 1, "edge", 0)
    with pytest.raises(DesiredRejected, match="above the maximum"):
        e.apply_desired("plant.t1", "setpoint", 99, "edge", 0)
    with pytest.raises(DesiredRejected, match="not a property"):
        e.apply_desired("plant.t1", "ghost", 1, "edge", 0)


def test_cloud_write_over_unacked_edge_write_is_a_recorded_conflict() -> None:
    e = engine_with()
    e.apply_desired("plant.t1", "setpoint", 20, "edge", 0, Stamp(100))
    out = e.apply_desired("plant.t1", "setpoint", 25, "cloud", 0, Stamp(200))
    assert out.won and out.desired.value == 25.0
    assert (
        out.conflict is not None and out.conflict.loser.value == 20.0 and out.conflict.loser.origin == "edge"
    )
    changes = e.drain()
    assert [ev.kind for ev in changes.events] == ["conflict"]
    assert "DesiredConflict" in e.outbox["plant.t1"].patch["conditions"]


def test_older_cloud_write_loses_to_newer_edge_write_and_is_recorded() -> None:
    e = engine_with()
    e.apply_desired("plant.t1", "setpoint", 20, "edge", 0, Stamp(300))
    out = e.apply_desired("plant.t1", "setpoint", 25, "cloud", 0, Stamp(200))
    assert not out.won and out.desired.value == 20.0
    assert out.conflict is not None and out.conflict.loser.origin == "cloud"
    assert "won over cloud value '25.0'" in out.conflict.describe()


def test_equal_stamps_go_to_the_cloud() -> None:
    e = engine_with()
    e.apply_desired("plant.t1", "setpoint", 20, "edge", 0, Stamp(300, 1))
    out = e.apply_desired("plant.t1", "setpoint", 25, "cloud", 0, Stamp(300, 1))
    assert out.won and out.desired.origin == "cloud"
    # ...and the edge cannot take it back with the same stamp.
    out = e.apply_desired("plant.t1", "setpoint", 21, "edge", 0, Stamp(300, 1))
    assert not out.won and out.desired.value == 25.0


def test_no_conflict_when_cloud_already_had_the_edge_value() -> None:
    e = engine_with()
    e.apply_desired("plant.t1", "setpoint", 20, "edge", 0, Stamp(100))
    rev = e.outbox["plant.t1"].revision
    assert e.outbox_acked("plant.t1", rev)
    out = e.apply_desired("plant.t1", "setpoint", 25, "cloud", 0, Stamp(200))
    assert out.won and out.conflict is None


def test_spec_replay_is_not_a_new_write() -> None:
    e = engine_with()
    spec = device("t1", {"setpoint": "22"})
    assert len(e.apply_spec(spec, 1000)) == 1
    e.apply_desired("plant.t1", "setpoint", 30, "edge", 2000)
    assert e.apply_spec(spec, 3000) == []  # same spec seen again: the edge value stays
    assert e.devices["plant.t1"].properties["setpoint"].desired.value == 30.0  # type: ignore[union-attr]
    changed = device("t1", {"setpoint": "23"})
    (out,) = e.apply_spec(changed, 4000)
    assert out.won and out.desired.value == 23.0  # a later spec change wins again


writes = st.lists(
    st.tuples(st.sampled_from(["cloud", "edge"]), st.integers(0, 5), st.integers(0, 2), st.integers(5, 35)),
    min_size=1,
    max_size=6,
    unique_by=lambda w: (w[0], w[1], w[2]),
)


@given(writes, st.randoms())
def test_rule_is_order_insensitive(ws: list[tuple[str, int, int, int]], rnd: Any) -> None:
    """Whatever way edge writes interleave with the cloud's, the one in effect is the
    max by (stamp, cloud-on-tie) of the edge writes and the cloud's last write: the rule
    needs no coordination between edge and cloud. Cloud writes arrive in the order the
    API server took them (the watch is ordered; their times never go backwards), and a
    newer spec value always replaces the one before it."""
    cloud = sorted((w for w in ws if w[0] == "cloud"), key=lambda w: (w[1], w[2]))
    edge = [w for w in ws if w[0] == "edge"]
    candidates = edge + cloud[-1:]
    winner = max(candidates, key=lambda w: (Stamp(w[1], w[2]), w[0] == "cloud"))
    # A random interleaving that keeps the cloud's order.
    order = ["c"] * len(cloud) + ["e"] * len(edge)
    rnd.shuffle(order)
    rnd.shuffle(edge)
    clouds, edges = iter(cloud), iter(edge)
    e = engine_with()
    for which in order:
        origin, wall, counter, value = next(clouds) if which == "c" else next(edges)
        e.apply_desired("plant.t1", "setpoint", value, origin, 0, Stamp(wall, counter))  # type: ignore[arg-type]
    d = e.devices["plant.t1"].properties["setpoint"].desired
    assert d is not None and (d.origin, d.stamp, d.value) == (
        winner[0],
        Stamp(winner[1], winner[2]),
        float(winner[3]),
    )


def test_a_newer_spec_value_replaces_the_previous_one_whatever_its_stamp() -> None:
    """A manifest's value applied at start (a millisecond stamp) is replaced by a
    kubectl patch a moment later, whose API-server time is cut to the second."""
    e = engine_with()
    e.apply_desired("plant.t1", "setpoint", 21.5, "cloud", 0, Stamp(1_000_015))
    out = e.apply_desired("plant.t1", "setpoint", 23, "cloud", 0, Stamp(1_000_000))
    assert out.won and out.conflict is None and out.desired.value == 23.0


@given(st.lists(st.tuples(st.integers(0, 10**6), st.booleans()), max_size=40))
def test_hlc_is_monotonic_and_passes_what_it_saw(steps: list[tuple[int, bool]]) -> None:
    clock = HybridClock()
    last = Stamp(0, 0)
    for wall, remote in steps:
        if remote:
            clock.observe(Stamp(wall, 3))
            assert clock.last >= Stamp(wall, 3)
        else:
            s = clock.now(wall)
            assert s > last
            last = s
        last = max(last, clock.last)


def test_stamp_text_round_trip() -> None:
    assert Stamp.parse(str(Stamp(1732640000000, 7))) == Stamp(1732640000000, 7)
    with pytest.raises(ValueError, match="not an HLC stamp"):
        Stamp.parse("yesterday")


def test_late_duplicate_ack_never_removes_a_newer_entry() -> None:
    e = engine_with()
    e.apply_reported("plant.t1", {"count": 1}, 0)
    first = e.outbox["plant.t1"].revision
    assert e.outbox_acked("plant.t1", first)
    e.apply_reported("plant.t1", {"count": 2}, 0)
    assert not e.outbox_acked("plant.t1", first)  # the same ack, delivered twice
    assert e.outbox["plant.t1"].patch["twins"]["count"]["reported"]["value"] == "2"


def test_ack_of_an_older_revision_keeps_the_entry_until_it_is_current() -> None:
    e = engine_with()
    e.apply_reported("plant.t1", {"count": 1}, 0)
    sent = e.outbox["plant.t1"].revision
    e.apply_reported("plant.t1", {"count": 2}, 0)  # changed while in flight
    assert not e.outbox_acked("plant.t1", sent)
    assert e.devices["plant.t1"].properties["count"].outbox_rev == e.outbox["plant.t1"].revision


# --------------------------------------------------------------------- writes
def test_write_is_retried_with_backoff_then_fails() -> None:
    e = engine_with()
    e.apply_desired("plant.t1", "setpoint", 21, "edge", 0)
    now = 0
    attempts = []
    for _ in range(200):
        due = e.due_writes(now)
        attempts.extend((now, r.attempt) for r in due)
        nxt = e.next_write_due()
        if nxt is None:
            break
        now = nxt
    assert [a for _, a in attempts] == list(range(1, MAX_WRITE_ATTEMPTS + 1))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(attempts)]
    assert gaps == sorted(gaps) and gaps[0] >= 500  # backoff grows
    prop = e.devices["plant.t1"].properties["setpoint"]
    assert prop.write_state is WriteState.FAILED and "after 8 attempts" in prop.write_reason
    assert "write_failed" in [ev.kind for ev in e.drain().events]


def test_write_applied_when_device_reports_desired_value() -> None:
    e = engine_with()
    out = e.apply_desired("plant.t1", "enabled", "true", "edge", 0)
    assert out.write_pending and e.deltas("plant.t1") == {"enabled": True}
    e.write_failed("plant.t1", "enabled", "device busy")
    assert e.devices["plant.t1"].properties["enabled"].write_reason == "device busy"
    e.apply_reported("plant.t1", {"enabled": 1}, 10)
    prop = e.devices["plant.t1"].properties["enabled"]
    assert prop.write_state is WriteState.APPLIED and prop.write_reason == ""
    assert e.deltas("plant.t1") == {}
    assert (
        e.outbox["plant.t1"].patch["twins"]["enabled"]["observedDesired"]["metadata"]["writeState"]
        == "applied"
    )


# --------------------------------------------------------------------- durability
class VersionMachine(RuleBasedStateMachine):
    """Reports, commits, clean restarts and crashes (uncommitted work thrown away).
    Versions that were ever committed are strictly increasing and never name two
    values; the outbox stays one entry per device, and applying it to what the cloud
    acknowledged gives the edge's status."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "s.db"
        self.store = Store(self.path)
        self.engine = self._fresh()
        self.committed: dict[tuple[str, str], dict[int, Any]] = {}
        self.cloud: dict[str, dict[str, Any]] = {d: {} for d in DEV_IDS}

    def _fresh(self) -> TwinEngine:
        engine = TwinEngine()
        for dev_id in DEV_IDS:
            engine.upsert_device(device(dev_id.split(".")[1]), MODEL)
        self.store.load_into(engine)
        engine.drain()
        return engine

    @rule(dev=st.sampled_from(DEV_IDS), prop=st.sampled_from(["count", "label"]), value=st.integers(0, 9))
    def report(self, dev: str, prop: str, value: int) -> None:
        self.engine.apply_reported(dev, {prop: value}, 1000)

    @rule(dev=st.sampled_from(DEV_IDS), value=st.integers(5, 35))
    def desire(self, dev: str, value: int) -> None:
        self.engine.apply_desired(dev, "setpoint", value, "edge", 1000)

    @rule()
    def commit(self) -> None:
        self.store.commit(snapshot(self.engine, self.engine.drain()))
        for dev in self.engine.devices.values():
            for name, p in dev.properties.items():
                if p.reported is not None:
                    seen = self.committed.setdefault((dev.id, name), {})
                    v = p.reported.version
                    assert seen.get(v, p.reported.value) == p.reported.value, "a version named two values"
                    assert all(v >= old for old in seen), "versions went backwards"
                    seen[v] = p.reported.value

    @rule()
    def crash(self) -> None:
        self.engine = self._fresh()  # whatever was not committed is gone

    @rule(dev=st.sampled_from(DEV_IDS))
    def cloud_acks(self, dev: str) -> None:
        self.commit()  # the uplink only ever sends what is committed
        entry = self.engine.outbox.get(dev)
        if entry is not None:
            self.cloud[dev] = apply_patch(self.cloud[dev], entry.patch)
            assert self.engine.outbox_acked(dev, entry.revision)
            assert dev not in self.engine.outbox

    @invariant()
    def outbox_bounded_and_converges(self) -> None:
        assert set(self.engine.outbox) <= set(DEV_IDS)
        for dev in DEV_IDS:
            entry = self.engine.outbox.get(dev)
            cloud = apply_patch(self.cloud[dev], entry.patch) if entry else self.cloud[dev]
            assert set(cloud.get("twins", {})) <= {p["name"] for p in THERMO_PROPS}
            want = self.engine.status_patch(dev)["twins"]
            assert cloud.get("twins", {}) == want

    @invariant()
    def urgency_read_from_the_marks_is_what_the_patch_shows(self) -> None:
        # The uplink orders a backlog by OutboxEntry.urgent without building patches.
        for entry in self.engine.outbox.values():
            patch = entry.patch
            twins = patch.get("twins") or {}
            shows = (
                "state" in patch
                or "conditions" in patch
                or any(isinstance(t, dict) and "observedDesired" in t for t in twins.values())
            )
            assert entry.urgent == shows

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()


VersionMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestVersions = VersionMachine.TestCase


def test_read_errors_mark_one_property_until_a_value_arrives() -> None:
    e = engine_with()
    e.set_read_errors("plant.t1", {"count": "Modbus exception 2 (illegal data address)"}, 0)
    prop = e.devices["plant.t1"].properties["count"]
    assert prop.read_error.startswith("Modbus exception 2")
    assert e.outbox["plant.t1"].patch["twins"]["count"]["readError"] == prop.read_error
    assert [ev.kind for ev in e.drain().events] == ["read_error"]
    e.set_read_errors("plant.t1", {"count": prop.read_error}, 1)  # the same again: nothing new
    assert not e.drain().events
    e.apply_reported("plant.t1", {"count": 5}, 2)
    assert prop.read_error == ""
    assert "readError" not in apply_patch({}, e.outbox["plant.t1"].patch)["twins"]["count"]


# --------------------------------------------------------------------- values the model cannot hold
def test_a_value_the_model_cannot_hold_is_a_read_error_logged_once_not_per_poll() -> None:
    """A uint64 register above 2^63 on an INT property, polled every 200 ms: the
    property shows why (readError) and keeps its last good value; the event log hears
    of it once, not once per poll."""
    e = engine_with()
    e.apply_reported("plant.t1", {"count": 7}, now_ms=0)
    e.drain()
    events = []
    for poll in range(1, 57):
        out = e.apply_reported("plant.t1", {"count": 2**64 - poll, "temperature": 20}, now_ms=poll * 200)
        assert "outside the 64-bit range" in out.rejected["count"]
        events += e.drain().events
    prop = e.devices["plant.t1"].properties["count"]
    assert prop.read_error.startswith("value rejected: integer") and "64-bit" in prop.read_error
    assert prop.reported is not None and prop.reported.value == 7  # the last good value stays
    assert [ev.kind for ev in events] == ["rejected"]
    assert e.outbox["plant.t1"].patch["twins"]["count"]["readError"] == prop.read_error
    # A good value clears the mark, in the twin and in the pending status patch.
    e.apply_reported("plant.t1", {"count": 8}, now_ms=20_000)
    assert prop.read_error == "" and e.outbox["plant.t1"].patch["twins"]["count"]["readError"] is None


def test_read_error_events_are_limited_per_property_and_count_what_they_held_back() -> None:
    e = engine_with()
    kinds: list[tuple[str, dict[str, Any]]] = []
    for poll in range(60):  # flapping: bad, good, bad, ... every second
        now = poll * 1000
        if poll % 2:
            e.apply_reported("plant.t1", {"count": 1}, now_ms=now)
        else:
            e.set_read_errors("plant.t1", {"count": f"cannot decode: frame {poll}"}, now)
        kinds += [(ev.kind, ev.detail) for ev in e.drain().events]
    assert [k for k, _ in kinds] == ["read_error"]
    # After the repeat interval the next change is logged, with how many were held back.
    e.set_read_errors("plant.t1", {"count": "cannot decode: later"}, 60_000 + EVENT_REPEAT_MS)
    (ev,) = e.drain().events
    assert ev.kind == "read_error" and ev.detail["suppressed"] == 29


def test_refused_desired_values_are_events_limited_per_property_and_unknown_names_share_one_limit() -> None:
    e = engine_with()
    for i in range(3):  # the same property refused again within the interval: one event
        with pytest.raises(DesiredRejected):
            e.apply_desired("plant.t1", "setpoint", "abc", "edge", now_ms=i)
    for i in range(1000):  # a client making up names: one event, one limiter entry
        with pytest.raises(DesiredRejected, match="not a property"):
            e.apply_desired("plant.t1", f"made-up-{i}", 1, "edge", now_ms=10 + i)
    events = e.drain().events
    assert [(ev.property, ev.kind) for ev in events] == [("setpoint", "rejected"), ("made-up-0", "rejected")]
    assert events[0].detail == {"reason": events[0].detail["reason"], "desired": "abc", "origin": "edge"}
    assert len(e._limiter._last) + len(e._limiter._held) <= 2 + 2  # bounded by the model, not the names
    # After the interval the next refusal is logged with how many were held back.
    with pytest.raises(DesiredRejected):
        e.apply_desired("plant.t1", "setpoint", "abc", "edge", now_ms=EVENT_REPEAT_MS + 10)
    (ev,) = e.drain().events
    assert ev.detail["suppressed"] == 2


def test_a_message_naming_thousands_of_unknown_properties_is_answered_in_bounded_space() -> None:
    e = engine_with()
    values = {f"{i}{'x' * 500}": i for i in range(5000)}
    out = e.apply_reported("plant.t1", values, now_ms=0)
    assert len(out.rejected) == MAX_REJECTED_LISTED + 1
    assert all(len(name) <= 64 for name in out.rejected)
    assert "4980 more" in out.rejected["..."]
    (ev,) = e.drain().events
    assert ev.detail["count"] == 5000 and len(ev.detail["names"]) == 10


# --------------------------------------------------------------------- writes pause while unreachable
def test_writes_to_a_device_that_cannot_be_reached_are_paused_not_spent() -> None:
    e = TwinEngine(writes=WritePolicy(attempts=3, backoff_min_ms=100, backoff_max_ms=100))
    e.upsert_device(device("t1"), MODEL)
    e.apply_desired("plant.t1", "setpoint", 21, "edge", 0)
    down = lambda _dev: False  # noqa: E731
    for now in range(0, 100_000, 50):  # a long outage: nothing handed out, nothing spent
        assert e.due_writes(now, down) == []
    prop = e.devices["plant.t1"].properties["setpoint"]
    assert prop.write_state is WriteState.PENDING and prop.write_attempts == 0
    assert e.next_write_due(down) is None  # no timer while nothing can be delivered
    # Back: attempts are spent again; one that still could not leave is given back.
    (req,) = e.due_writes(100_000)
    assert req.attempt == 1
    e.write_undelivered("plant.t1", "setpoint", 100_000, "the MQTT broker is not connected")
    assert prop.write_attempts == 0 and prop.write_reason == "the MQTT broker is not connected"
    attempts = []
    for now in range(100_000, 110_000, 10):
        attempts += [r.attempt for r in e.due_writes(now)]
    assert attempts == [1, 2, 3] and prop.write_state is WriteState.FAILED
