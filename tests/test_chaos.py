"""A short seed of the chaos harness (scripts/chaos, tests/harness/chaos.py): the whole
system on loopback, every kind of fault drawn from the seed, then the invariants. The
long runs (100 faults and more) are in docs/architecture.md."""

from __future__ import annotations

from pathlib import Path

from tests.harness.chaos import run


async def test_a_short_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    report = await run(seed=2026, faults=16, duration_s=60, workdir=tmp_path / "chaos")
    print(report.text())
    assert sum(report.faults.values()) + sum(report.skipped.values()) >= 16
    assert report.acknowledged > 500
    assert report.ok, report.text()
