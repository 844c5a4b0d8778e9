"""What the benchmarks send: readings that look like a plant's, not a friendly stream.

Every device reports its own random reading (a plausible number of digits, like
``-417.23``), each update names a property drawn at random, and nothing is repeated
across devices, so neither compression nor the outbox's composition gets an easy case.
The old friendly workload (one property, the same value from every device) is kept only
to be printed as a labelled extra line. tests/test_benches.py checks these properties.
"""

from __future__ import annotations

import random

Update = tuple[str, dict[str, float]]  # device id, {property: reading}


def reading(rng: random.Random) -> float:
    """A sensor reading with two decimals in [-500, 500), like -417.23 (about 17 bits)."""
    return round(rng.uniform(-500.0, 500.0), 2)


def steady(devices: list[str], props: int, seconds: int, rng: random.Random) -> list[list[Update]]:
    """Per second, one update per device: a random property with a fresh random reading."""
    return [[(dev, {f"p{rng.randrange(props)}": reading(rng)}) for dev in devices] for _ in range(seconds)]


def friendly(devices: list[str], seconds: int) -> list[list[Update]]:
    """The workload the link benchmark used to measure: p0 with the same value from every
    device in a second (it compresses to almost nothing). Printed as an extra line only."""
    return [[(dev, {"p0": 20 + second / 10}) for dev in devices] for second in range(seconds)]


def backlog(devices: list[str], props: int, changes: int, rng: random.Random) -> list[Update]:
    """While the link is cut: every property of every device changes ``changes`` times,
    each time to a fresh random reading (the outbox keeps the newest of each)."""
    return [(dev, {f"p{i}": reading(rng) for i in range(props)}) for _ in range(changes) for dev in devices]
