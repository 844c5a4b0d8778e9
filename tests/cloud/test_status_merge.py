"""The relay's status rule is idempotent and order-insensitive: any delivery order of a
gateway's outbox messages, with replays and duplicates, ends in the status that in-order
delivery gives (hypothesis)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from edgetwin.cloud.status_merge import merge_edge_status, summary

PROPS = ("temperature", "setpoint", "humidity")


@st.composite
def outbox_messages(draw: st.DrawFn) -> list[tuple[dict[str, Any], int]]:
    """What a gateway's outbox sends over time: each message a composed patch of some
    fields, with a strictly increasing revision; reported versions increase per property."""
    versions = dict.fromkeys(PROPS, 0)
    messages = []
    for rev in range(1, draw(st.integers(1, 12)) + 1):
        patch: dict[str, Any] = {}
        if draw(st.booleans()):
            patch["state"] = draw(st.sampled_from(["online", "offline"]))
            patch["lastOnlineTime"] = f"t{rev}"
        if draw(st.booleans()):
            patch["conditions"] = {
                "DesiredConflict": draw(
                    st.one_of(st.none(), st.just({"status": "True", "message": f"m{rev}"}))
                )
            }
        twins: dict[str, Any] = {}
        for name in draw(st.lists(st.sampled_from(PROPS), unique=True)):
            if draw(st.integers(0, 5)) == 0:
                twins[name] = None  # the property left the model
                continue
            change: dict[str, Any] = {}
            if draw(st.booleans()):
                versions[name] += draw(st.integers(1, 3))
                change["reported"] = {
                    "value": f"v{versions[name]}",
                    "metadata": {"version": str(versions[name]), "timestamp": str(1_700_000_000_000 + rev)},
                }
            if draw(st.booleans()):
                change["readError"] = draw(st.sampled_from([None, f"timeout at {rev}"]))
            if draw(st.booleans()):
                change["observedDesired"] = {"value": f"d{rev}", "metadata": {"origin": "edge"}}
            twins[name] = change
        if twins:
            patch["twins"] = twins
        messages.append((patch, rev))
    return messages


def apply_all(messages: list[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for patch, rev in messages:
        status = merge_edge_status(status, patch, rev)
    return status


@given(outbox_messages(), st.randoms(use_true_random=False), st.integers(0, 5))
def test_any_order_with_replays_ends_where_in_order_delivery_does(
    messages: list[tuple[dict[str, Any], int]], rnd: Any, replays: int
) -> None:
    expected = apply_all(messages)
    shuffled = list(messages) + [rnd.choice(messages) for _ in range(replays)]
    rnd.shuffle(shuffled)
    assert apply_all(shuffled) == expected


@given(outbox_messages())
def test_applying_a_message_twice_changes_nothing(messages: list[tuple[dict[str, Any], int]]) -> None:
    status = apply_all(messages)
    for patch, rev in messages:
        assert merge_edge_status(status, patch, rev) == status


def test_an_older_reported_version_never_overwrites_a_newer_one() -> None:
    newer = {"twins": {"t": {"reported": {"value": "22", "metadata": {"version": "9"}}}}}
    older = {"twins": {"t": {"reported": {"value": "21", "metadata": {"version": "8"}}}}}
    # The older value arrives later, with a later outbox revision (a replay after restart).
    status = merge_edge_status(merge_edge_status(None, newer, 5), older, 6)
    assert status["twins"] == [
        {"propertyName": "t", "reported": {"value": "22", "metadata": {"version": "9"}}}
    ]
    assert status["summary"] == "t=22"


def test_read_errors_and_conditions_are_set_and_cleared() -> None:
    s = merge_edge_status(
        None,
        {"twins": {"t": {"readError": "timeout"}}, "conditions": {"DesiredConflict": {"status": "True"}}},
        1,
    )
    assert s["twins"][0]["readError"] == "timeout"
    assert s["conditions"] == [{"status": "True", "type": "DesiredConflict"}]
    s = merge_edge_status(
        s, {"twins": {"t": {"readError": None}}, "conditions": {"DesiredConflict": None}}, 2
    )
    assert s["twins"] == [] and s["conditions"] == []  # a twin with nothing left goes
    assert s["revisions"] == {"readError/t": 2, "conditions/DesiredConflict": 2}


def test_summary_is_short() -> None:
    twins = [{"propertyName": f"p{i}", "reported": {"value": "12345"}} for i in range(10)]
    assert len(summary(twins)) == 60 and summary(twins).endswith("...")


def test_a_removed_property_leaves_status_and_may_come_back() -> None:
    value = {"twins": {"t": {"reported": {"value": "22", "metadata": {"version": "9", "timestamp": "5"}}}}}
    status = merge_edge_status(None, value, 5)
    status = merge_edge_status(status, {"twins": {"t": None}}, 6)
    assert status["twins"] == [] and "lastReportTime" not in status
    assert merge_edge_status(status, value, 5) == status  # a replay of the older message
    # Added back to the model: its versions start again and are taken.
    again = {"twins": {"t": {"reported": {"value": "1", "metadata": {"version": "1", "timestamp": "7"}}}}}
    status = merge_edge_status(status, again, 7)
    assert status["twins"][0]["reported"]["value"] == "1"


def test_the_newest_report_time_is_shown_for_staleness() -> None:
    def reported(version: int, ts: int) -> dict[str, Any]:
        return {"reported": {"value": "x", "metadata": {"version": str(version), "timestamp": str(ts)}}}

    status = merge_edge_status(None, {"twins": {"a": reported(1, 1_764_300_000_123), "b": reported(1, 5)}}, 1)
    assert status["lastReportTime"] == "2025-11-28T03:20:00.123Z"
    status = merge_edge_status(status, {"twins": {"b": reported(2, 1_764_300_060_000)}}, 2)
    assert status["lastReportTime"] == "2025-11-28T03:21:00.000Z"
    # Nonsense timestamps from a peer are ignored, not raised on.
    status = merge_edge_status(None, {"twins": {"a": reported(1, 10**30)}}, 1)
    assert "lastReportTime" not in status
