"""Bad input gets a clear error: any bytes on the inbound topics either parse or raise
PayloadError with a reason; never another exception."""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.mqtt.payloads import PayloadError, parse_state_update, parse_twin_get, parse_twin_update

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "event_id": json_values,
        "timestamp": json_values,
        "state": json_values,
        "twin": st.dictionaries(
            st.text(max_size=6),
            st.dictionaries(st.sampled_from(["actual", "expected", "metadata"]), json_values, max_size=3)
            | json_values,
            max_size=3,
        ),
    },
).map(lambda d: json.dumps(d).encode())
payloads = st.binary(max_size=200) | shaped | json_values.map(lambda v: json.dumps(v).encode())


@settings(max_examples=2000)
@given(payloads)
@example(b'{"timestamp": Infinity, "twin": {"a": {"actual": {"value": 1}}}}')
@example(b'{"timestamp": NaN, "twin": {"a": {"actual": {"value": 1}}}}')
@example(b'{"timestamp": 1e300, "twin": {"a": {"actual": {"value": 1}}}}')
def test_parsers_accept_or_explain(payload: bytes) -> None:
    for parse in (parse_twin_update, parse_twin_get, parse_state_update):
        try:
            parse(payload, 65536)
        except PayloadError as exc:
            assert exc.reason and exc.kind in {"not_json", "bad_shape", "oversize"}
