"""Outbox composition: composing status patches equals applying them one by one."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from edgetwin.sync.patch import apply_patch, compose, compose_into

PROPS = ["temperature", "setpoint", "pump"]
leaf = st.one_of(st.text(max_size=4), st.integers(-3, 3))
maybe_leaf = st.one_of(st.none(), leaf)  # None deletes a leaf


def _obj(keys: list[str], value: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), value, max_size=len(keys))


# Status-shaped patches: every key is always an object or always a leaf.
metadata = _obj(["timestamp", "version", "type", "origin", "stamp", "writeState"], maybe_leaf)
value_entry = st.fixed_dictionaries({}, optional={"value": maybe_leaf, "metadata": metadata})
twin_entry = _obj(["reported", "observedDesired"], value_entry)
condition = _obj(["type", "status", "reason", "message"], maybe_leaf)
status_patch = st.fixed_dictionaries(
    {},
    optional={
        "state": maybe_leaf,
        "lastOnlineTime": maybe_leaf,
        "twins": _obj(PROPS, twin_entry),
        "conditions": _obj(["DesiredConflict"], condition),
    },
)
status_doc = status_patch.map(lambda p: apply_patch({}, p))


@given(status_doc, st.lists(status_patch, min_size=1, max_size=6))
def test_compose_equals_sequential_application(target: dict[str, Any], patches: list[dict[str, Any]]) -> None:
    sequential = target
    for p in patches:
        sequential = apply_patch(sequential, p)
    composed: dict[str, Any] = {}
    for p in patches:
        composed = compose(composed, p)
    assert apply_patch(target, composed) == sequential


@given(status_patch, status_patch, status_patch)
def test_compose_is_associative(a: dict[str, Any], b: dict[str, Any], c: dict[str, Any]) -> None:
    assert compose(compose(a, b), c) == compose(a, compose(b, c))


@given(st.lists(status_patch, min_size=1, max_size=6))
def test_compose_into_matches_compose_and_does_not_alias(patches: list[dict[str, Any]]) -> None:
    pending: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    originals = [repr(p) for p in patches]
    for p in patches:
        compose_into(pending, p)
        expected = compose(expected, p)
    assert pending == expected
    assert [repr(p) for p in patches] == originals  # inputs untouched


def test_apply_patch_rfc7386_examples() -> None:
    assert apply_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert apply_patch({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert apply_patch({"a": "b"}, {"a": None}) == {}
    assert apply_patch({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}) == {"a": {"b": "d"}}
    assert apply_patch({"a": [1]}, {"a": [2]}) == {"a": [2]}
    assert apply_patch({"a": "foo"}, "bar") == "bar"
