"""Read planning: few requests, within the protocol limits, every property covered."""

from __future__ import annotations

from functools import cache

from hypothesis import given
from hypothesis import strategies as st

from edgetwin.mappers.modbus.planner import ReadRequest, Span, plan_reads


def test_three_register_blocks_and_forty_coils_take_four_requests() -> None:
    spans = [Span(f"r{i}", "holding_register", a, 1) for i, a in enumerate(range(0, 34))]
    spans += [Span(f"s{i}", "holding_register", a, 1) for i, a in enumerate(range(1000, 1033))]
    spans += [Span(f"t{i}", "holding_register", a, 1) for i, a in enumerate(range(5000, 5033))]
    spans += [Span(f"c{i}", "coil", a, 1) for i, a in enumerate(range(40))]
    assert len(spans) == 140
    plan = plan_reads(spans)
    assert len(plan) == 4
    assert sorted((r.table, r.address, r.count) for r in plan) == [
        ("coil", 0, 40),
        ("holding_register", 0, 34),
        ("holding_register", 1000, 33),
        ("holding_register", 5000, 33),
    ]


def test_limits_split_long_runs_and_gaps_split_far_ranges() -> None:
    regs = [Span(f"p{i}", "input_register", i * 2, 2) for i in range(100)]  # 200 registers
    plan = plan_reads(regs)
    assert [r.count for r in plan] == [124, 76]  # never more than 125
    far = [Span("a", "holding_register", 0, 1), Span("b", "holding_register", 12, 1)]
    assert len(plan_reads(far, max_gap=10)) == 2
    assert len(plan_reads(far, max_gap=11)) == 1


def _check(spans: list[Span], plan: list[ReadRequest], max_gap: int, limit: int) -> None:
    covered = [m for r in plan for m in r.members]
    assert sorted(covered, key=repr) == sorted(spans, key=repr)  # each exactly once
    for r in plan:
        assert r.count <= limit
        for m in r.members:
            s = r.slice_for(m)
            assert s.start >= 0 and s.stop <= r.count and m.table == r.table
        ordered = sorted(r.members, key=lambda m: m.address)
        end = ordered[0].end
        for m in ordered[1:]:
            assert m.address - end <= max_gap
            end = max(end, m.end)


@cache
def _fewest(starts: tuple[tuple[int, int], ...], max_gap: int, limit: int) -> int:
    """Exhaustive: fewest contiguous groups of the sorted spans."""
    if not starts:
        return 0
    best = len(starts)
    for k in range(1, len(starts) + 1):
        group = starts[:k]
        end = group[0][0] + group[0][1]
        ok = True
        for a, c in group[1:]:
            if a - end > max_gap:
                ok = False
                break
            end = max(end, a + c)
        if not ok or end - group[0][0] > limit:
            break
        best = min(best, 1 + _fewest(starts[k:], max_gap, limit))
    return best


non_overlapping = st.lists(st.tuples(st.integers(0, 6), st.integers(1, 4)), min_size=1, max_size=12).map(
    lambda steps: [
        Span(f"p{i}", "holding_register", sum(g + c for g, c in steps[:i]) + steps[i][0], steps[i][1])
        for i in range(len(steps))
    ]
)


@given(non_overlapping, st.integers(0, 5), st.integers(4, 16))
def test_plan_is_valid_and_minimal(spans: list[Span], max_gap: int, limit: int) -> None:
    plan = plan_reads(spans, max_gap=max_gap, max_registers=limit)
    _check(spans, plan, max_gap, limit)
    ordered = tuple(sorted((s.address, s.count) for s in spans))
    assert len(plan) == _fewest(ordered, max_gap, limit)


@given(
    st.lists(
        st.tuples(st.sampled_from(["coil", "holding_register"]), st.integers(0, 300), st.integers(1, 4)),
        min_size=1,
        max_size=40,
    ),
    st.integers(0, 20),
)
def test_any_layout_is_covered_within_limits(raw: list[tuple[str, int, int]], max_gap: int) -> None:
    spans = [Span(f"p{i}", t, a, 1 if t == "coil" else c) for i, (t, a, c) in enumerate(raw)]
    plan = plan_reads(spans, max_gap=max_gap, max_registers=16, max_bits=32)
    for r in plan:
        _check([m for m in r.members], [r], max_gap, 32 if r.table == "coil" else 16)
    assert sum(len(r.members) for r in plan) == len(spans)
