"""Status deltas on one uplink stream (gateway/uplink_stream.py, OutboxEntry.patch_since):
a device's first message on a stream is its whole outbox entry, each later one what
changed since; composed in order they are the entry (hypothesis), and an entry leaves
the outbox only when every message of its chain was applied: a refusal or a part
dropped unsent sends the entry whole again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edgetwin.deviceapi import DeviceModel
from edgetwin.gateway.config import UplinkConfig
from edgetwin.gateway.twin.engine import TwinEngine
from edgetwin.gateway.uplink import Uplink
from edgetwin.gateway.uplink_stream import Stream
from edgetwin.sync.patch import compose
from tests.conftest import THERMO_PROPS, model_doc
from tests.gateway.twin.test_engine import device

MODEL = DeviceModel.model_validate(model_doc("thermostat", "plant", THERMO_PROPS))
DEV = "plant.t1"


def stream(deltas: bool = True, clock: list[int] | None = None) -> tuple[Stream, TwinEngine]:
    """A stream on an engine with two thermostats; ``clock[0]`` is the engine's wall clock."""
    engine = TwinEngine(wall_ms=lambda: clock[0]) if clock is not None else TwinEngine()
    engine.upsert_device(device("t1"), MODEL)
    engine.upsert_device(device("t2"), MODEL)
    cfg = UplinkConfig(address="relay:7443", ca_file=Path("ca"), cert_file=Path("c"), key_file=Path("k"))
    s = Stream(Uplink(cfg, engine, changed=lambda: None, on_cloud=lambda _m: None), call=None)
    s.deltas = deltas
    return s, engine


def settled(deltas: bool = True, clock: list[int] | None = None) -> tuple[Stream, TwinEngine]:
    """A stream whose first messages (the definitions' entries) were sent and applied:
    the outbox is empty and each device's chain has begun."""
    s, engine = stream(deltas, clock)
    engine.drain()
    for msg in sent(s).values():
        applied(s, msg)
    return s, engine


def sent(s: Stream) -> dict[str, dict[str, Any]]:
    """The next frame's status messages, by device."""
    messages, _ = s._status_batch()
    return {m["dev"]: m for m in messages if m["t"] == "status"}


def applied(s: Stream, msg: dict[str, Any]) -> None:
    s.answered({"t": "applied", "dev": msg["dev"], "rev": msg["rev"]})


changes = st.lists(
    st.one_of(
        st.tuples(st.just("report"), st.sampled_from(["temperature", "count", "label"]), st.integers(0, 100)),
        st.tuples(st.just("state"), st.sampled_from(["online", "offline"]), st.just(0)),
        st.tuples(st.just("error"), st.sampled_from(["count", "label"]), st.just(0)),
        st.tuples(st.just("send"), st.just(""), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(changes)
def test_a_chain_of_deltas_composes_to_the_whole_entry(steps: list[tuple[str, str, int]]) -> None:
    s, engine = stream()
    engine.drain()
    s._status_batch()  # the definitions' entries: the chain starts here
    composed: dict[str, Any] = dict(engine.outbox[DEV].patch) if DEV in engine.outbox else {}
    now = 1_000
    for kind, name, value in steps:
        now += 10
        if kind == "report":
            engine.apply_reported(DEV, {name: value if name != "label" else str(value)}, now_ms=now)
        elif kind == "state":
            engine.set_state(DEV, name, now)
        elif kind == "error":
            engine.set_read_errors(DEV, {name: f"timeout {now}"}, now)
        else:
            msg = sent(s).get(DEV)
            if msg is not None:
                composed = compose(composed, msg["patch"])
    msg = sent(s).get(DEV)
    if msg is not None:
        composed = compose(composed, msg["patch"])
    if DEV in engine.outbox:
        assert composed == engine.outbox[DEV].patch


def test_later_messages_carry_only_what_changed_and_the_last_applied_empties_the_outbox() -> None:
    s, engine = settled()
    assert not engine.outbox
    engine.apply_reported(DEV, {"temperature": 20.5, "count": 3}, now_ms=1000)
    first = sent(s)[DEV]
    assert set(first["patch"]["twins"]) == {"temperature", "count"}
    engine.apply_reported(DEV, {"count": 4}, now_ms=2000)
    second = sent(s)[DEV]
    assert second["patch"] == {"twins": {"count": second["patch"]["twins"]["count"]}}
    assert second["patch"]["twins"]["count"]["reported"]["value"] == "4"
    applied(s, first)  # the older answer: the entry has changed since
    assert DEV in engine.outbox
    applied(s, second)
    assert DEV not in engine.outbox


def test_a_refused_message_breaks_the_chain_and_the_entry_goes_whole_again() -> None:
    s, engine = settled()
    engine.apply_reported(DEV, {"temperature": 20.5}, now_ms=1000)
    first = sent(s)[DEV]
    engine.apply_reported(DEV, {"count": 4}, now_ms=2000)
    second = sent(s)[DEV]
    assert "temperature" not in second["patch"]["twins"]
    # The relay could not write the first (the Device did not exist yet), then wrote the
    # second alone: the temperature never reached the cluster.
    s.answered({"t": "refused", "dev": DEV, "rev": first["rev"], "reason": "not found", "retry": True})
    applied(s, second)
    assert DEV in engine.outbox, "the entry left the outbox with part of it never written"
    again = sent(s)[DEV]
    assert set(again["patch"]["twins"]) == {"temperature", "count"}
    applied(s, again)
    assert DEV not in engine.outbox


def test_a_relay_without_deltas_gets_the_whole_entry_every_time() -> None:
    s, engine = settled(deltas=False)
    engine.apply_reported(DEV, {"temperature": 20.5}, now_ms=1000)
    sent(s)
    engine.apply_reported(DEV, {"count": 4}, now_ms=2000)
    assert set(sent(s)[DEV]["patch"]["twins"]) == {"temperature", "count"}


def oldest(engine: TwinEngine, round_trip_ms: int = 0) -> int | None:
    """What BACKLOG's age is read from: the oldest entry's time, or at most an answer's
    round trip younger (an entry that an answer moved on goes to the end of the order)."""
    count, since = engine.backlog()
    assert count == len(engine.outbox)
    first = min((e.since_ms for e in engine.outbox.values()), default=None)
    if first is None or since is None:
        assert since == first
    else:
        assert first <= since <= first + round_trip_ms
    return since


def test_a_device_changing_faster_than_answers_is_pending_only_since_its_last_answered_message() -> None:
    # Every change comes before the answer to the message before it, so the entry never
    # leaves the outbox; its age must stay within an answer's round trip, not grow from
    # its first change.
    clock = [1_000]
    s, engine = settled(clock=clock)
    taken = []
    messages = []
    late = None
    for step in range(5):
        clock[0] = 2_000 + 1_000 * step
        engine.apply_reported(DEV, {"temperature": 20 + step}, now_ms=clock[0])
        if step == 1:  # t2 changes once, after t1's first change; answered late
            engine.apply_reported("plant.t2", {"count": 1}, now_ms=clock[0])
        clock[0] += 300
        batch = sent(s)
        late = late or batch.get("plant.t2")
        messages.append(batch[DEV])
        taken.append(clock[0])
        if step:
            applied(s, messages[step - 1])  # an earlier message of the chain
            assert engine.outbox[DEV].since_ms == taken[step - 1]
        oldest(engine, round_trip_ms=1_000)  # each message is answered a step later
    assert late is not None
    assert oldest(engine) == 3_000  # t2's entry, younger than t1's first change
    assert list(engine.outbox) == ["plant.t2", DEV], "the first entry is the oldest"
    clock[0] = 7_000
    engine.apply_reported(DEV, {"temperature": 30}, now_ms=clock[0])
    applied(s, messages[-1])  # the newest message, but the entry changed since
    assert engine.outbox[DEV].since_ms == taken[-1]
    applied(s, late)
    assert oldest(engine) == taken[-1]


def test_after_a_refusal_a_later_delta_does_not_stand_for_the_messages_before_it() -> None:
    clock = [1_000]
    s, engine = settled(clock=clock)
    messages = []
    for step in range(3):
        clock[0] = 2_000 + 1_000 * step
        engine.apply_reported(DEV, {"temperature" if step == 0 else "count": step}, now_ms=clock[0])
        messages.append(sent(s)[DEV])
    created = engine.outbox[DEV].since_ms
    s.answered({"t": "refused", "dev": DEV, "rev": messages[0]["rev"], "reason": "not found", "retry": True})
    applied(s, messages[1])  # a delta without the refused temperature
    assert engine.outbox[DEV].since_ms == created
    applied(s, messages[2])
    assert engine.outbox[DEV].since_ms == created, "the temperature still waits"
    again = sent(s)[DEV]
    assert "temperature" in again["patch"]["twins"]
    applied(s, again)
    assert DEV not in engine.outbox


def test_without_deltas_each_answered_message_stands_alone() -> None:
    clock = [1_000]
    s, engine = settled(deltas=False, clock=clock)
    messages = []
    for step in range(3):
        clock[0] = 2_000 + 1_000 * step
        engine.apply_reported(DEV, {"count": step}, now_ms=clock[0])
        clock[0] += 100
        messages.append(sent(s)[DEV])
    s.answered({"t": "refused", "dev": DEV, "rev": messages[0]["rev"], "reason": "not found", "retry": True})
    applied(s, messages[1])
    assert engine.outbox[DEV].since_ms == 3_100
