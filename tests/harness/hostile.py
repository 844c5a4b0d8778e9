"""What attackers and broken devices send, as hypothesis strategies: deep nesting, huge
numbers, huge strings, invalid UTF-8, oversized collections, wrong types in every place.

`EDGETWIN_FUZZ=long` (scripts/fuzz) runs every fuzz test with 10,000 examples; the default
is a few hundred so `scripts/test` stays quick.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import strategies as st

LONG = os.environ.get("EDGETWIN_FUZZ") == "long"


def examples(default: int) -> int:
    """Examples per fuzz test: ``default``, or 10,000 in the long profile."""
    return 10_000 if LONG else default


# --------------------------------------------------------------------- values
huge_ints = st.one_of(
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**64), max_value=-(2**63) + 2),
    st.integers(min_value=10**300, max_value=10**310),
)
huge_strings = st.builds(
    lambda c, n: c * n,
    st.sampled_from(["a", "\u00e9", "\U0001f600", "\x00", " "]),
    st.integers(10_000, 70_000),
)
odd_floats = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -1e-308, 5e-324])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    odd_floats,
    st.text(max_size=12),
    st.sampled_from(["", "true", "1e400", "-0", "0x10", "NaN", "\ud800"[:0] + "\u0000"]),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)


# What msgpack can carry (no integers beyond 64 bits): for sync frames.
msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.binary(max_size=12),
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)


def _deep(depth: int, opener: str) -> str:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        return '{"a":' * depth + "1" + "}" * depth
    return opener * depth + closer * depth


deep_text = st.builds(_deep, st.integers(900, 60_000), st.sampled_from(["[", "{"]))
unbalanced_deep = st.builds(lambda n: "[" * n, st.integers(1_000, 60_000))
huge_number_text = st.builds(lambda n: "9" * n, st.integers(4_000, 20_000))


# --------------------------------------------------------------------- bytes
def _dump(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


invalid_utf8 = st.builds(
    lambda prefix, bad, suffix: prefix + bad + suffix,
    st.binary(max_size=20),
    st.sampled_from(
        [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]
    ),
    st.binary(max_size=20),
)


def twin_update_around(inner: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """A twin/update whose value (or whole twin) is replaced by hostile JSON text."""
    return st.one_of(
        st.builds(lambda t: ('{"event_id":"h","twin":{"p":{"actual":{"value":' + t + "}}}}").encode(), inner),
        st.builds(lambda t: ('{"event_id":"h","twin":' + t + "}").encode(), inner),
        st.builds(lambda t: ('{"event_id":' + t + ',"twin":{"p":{"actual":{"value":1}}}}').encode(), inner),
    )


mqtt_payloads = st.one_of(
    st.binary(max_size=300),
    invalid_utf8,
    json_values.map(_dump),
    st.fixed_dictionaries(
        {},
        optional={
            "event_id": json_values | huge_strings,
            "timestamp": json_values | huge_ints,
            "state": json_values,
            "twin": st.dictionaries(
                st.text(max_size=8) | huge_strings,
                st.dictionaries(st.sampled_from(["actual", "expected", "metadata"]), json_values, max_size=3)
                | json_values,
                max_size=4,
            ),
        },
    ).map(_dump),
    twin_update_around(deep_text | unbalanced_deep | huge_number_text),
    huge_strings.map(lambda s: _dump({"event_id": "h", "twin": {"p": {"actual": {"value": s}}}})),
    st.dictionaries(huge_strings, st.just({"actual": {"value": 1}}), min_size=1, max_size=2).map(
        lambda twin: _dump({"event_id": "h", "twin": twin})
    ),
)


# --------------------------------------------------------------------- Kubernetes objects
names = st.one_of(st.text(max_size=10), st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True), huge_strings)


def k8s_objects(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """Device or DeviceModel dicts, mostly plausible, with hostile values anywhere."""
    meta = st.fixed_dictionaries(
        {"name": names, "namespace": st.sampled_from(["plant", "default"]) | names},
        optional={
            "resourceVersion": st.integers(0, 10**6).map(str) | json_values,
            "generation": st.integers(0, 10) | json_values,
            "managedFields": st.lists(
                st.fixed_dictionaries({}, optional={"time": json_values | st.just("2026-01-01T00:00:00Z")}),
                max_size=3,
            )
            | json_values,
        },
    )
    prop = st.fixed_dictionaries(
        {"name": names},
        optional={
            "type": st.sampled_from(["INT", "FLOAT", "STRING", "BOOLEAN", "BYTES", "int", ""]) | json_values,
            "accessMode": st.sampled_from(["ReadOnly", "ReadWrite", "rw"]),
            "desired": st.fixed_dictionaries({"value": json_values | huge_strings}) | json_values,
            "visitors": st.fixed_dictionaries(
                {"protocolName": st.sampled_from(["modbus", "ble", "virtual"])},
                optional={
                    "configData": st.dictionaries(st.text(max_size=8), json_values, max_size=5) | json_values
                },
            ),
            "collectCycle": json_values | huge_ints,
            "minimum": json_values,
            "maximum": json_values,
        },
    )
    spec = st.fixed_dictionaries(
        {},
        optional={
            "nodeName": st.just("edge-f") | names,
            "deviceModelRef": st.fixed_dictionaries({"name": st.just("m") | names}) | json_values,
            "protocol": st.fixed_dictionaries(
                {"protocolName": st.sampled_from(["modbus", "ble", "virtual", "nope"]) | names},
                optional={
                    "configData": st.dictionaries(st.text(max_size=8), json_values, max_size=5) | json_values
                },
            )
            | json_values,
            "properties": st.lists(prop | json_values, max_size=5) | json_values,
        },
    )
    status = st.fixed_dictionaries(
        {},
        optional={
            "twins": st.lists(
                st.fixed_dictionaries(
                    {"propertyName": names},
                    optional={"reported": json_values, "observedDesired": json_values},
                )
                | json_values,
                max_size=4,
            )
            | json_values,
            "observedGeneration": json_values,
        },
    )
    return st.fixed_dictionaries(
        {"apiVersion": st.just("edgetwin.io/v1alpha1") | json_values, "kind": st.just(kind) | json_values},
        optional={"metadata": meta | json_values, "spec": spec | json_values, "status": status | json_values},
    )
