"""The benchmarks measure realistic data by default (the lesson of waves 1 and 2: a
friendly workload made the link look 4x better than a plant gets): distinct readings
per device, random properties, plausible digits."""

from __future__ import annotations

import random

from scripts.bench import workloads

DEVICES = [f"plant.s{d:04d}" for d in range(50)]


def test_the_steady_workload_sends_distinct_values_and_many_properties_each_second() -> None:
    seconds = workloads.steady(DEVICES, props=10, seconds=10, rng=random.Random(1))
    assert len(seconds) == 10 and all(len(s) == len(DEVICES) for s in seconds)
    for updates in seconds:
        values = [v for _, u in updates for v in u.values()]
        names = {p for _, u in updates for p in u}
        assert len(set(values)) >= 0.9 * len(values)  # no value shared by the devices
        assert len(names) >= 5  # not one property for all
        assert {d for d, _ in updates} == set(DEVICES)
    texts = [str(abs(v)) for s in seconds for _, u in s for v in u.values()]
    assert sum(len(t) >= 5 for t in texts) >= 0.8 * len(texts)  # like 417.23, not 20.1


def test_the_backlog_changes_every_property_with_fresh_readings() -> None:
    updates = workloads.backlog(DEVICES[:5], props=10, changes=5, rng=random.Random(2))
    assert len(updates) == 25
    per_device: dict[str, list[dict[str, float]]] = {}
    for dev, values in updates:
        assert set(values) == {f"p{i}" for i in range(10)}
        per_device.setdefault(dev, []).append(values)
    for changes in per_device.values():
        assert len({tuple(c.values()) for c in changes}) == 5


def test_the_link_bench_runs_the_realistic_workload_by_default() -> None:
    """The friendly workload appears only behind its label."""
    import inspect

    from scripts.bench import link

    source = inspect.getsource(link.main)
    assert "workloads.steady(" in source and "workloads.backlog(" in source
    assert source.count("workloads.friendly(") == 1
    assert "friendly workload (extra line" in source
