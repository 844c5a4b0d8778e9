"""Read planning: the fewest Modbus requests that read every property of a device.

Properties are grouped by table (and by the caller by collect cycle); within a table,
sorted by address, a greedy sweep merges ranges separated by at most ``max_gap`` unused
addresses while the request stays within the protocol limit (125 registers, 2,000 bits).
For spans that do not overlap (distinct registers, or several bits of one register) the
greedy sweep gives the fewest requests: every gap is between neighbours, so any run of a
feasible request is feasible too (tests/mappers/modbus/test_modbus_planner.py checks it against an
exhaustive search). Overlapping spans are planned correctly, perhaps not minimally.
Results are split back per property with :meth:`ReadRequest.slice_for`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edgetwin.mappers.modbus.config import BIT_TABLES, MAX_READ_BITS, MAX_READ_REGISTERS

TABLE_ORDER = ("coil", "discrete_input", "holding_register", "input_register")


@dataclass(frozen=True, slots=True)
class Span:
    """One property's place on the device."""

    key: str
    table: str
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class ReadRequest:
    table: str
    address: int
    count: int
    members: tuple[Span, ...]

    def slice_for(self, span: Span) -> slice:
        """Where ``span``'s registers (or bits) sit in this request's result."""
        start = span.address - self.address
        return slice(start, start + span.count)


def plan_reads(
    spans: Iterable[Span],
    max_gap: int = 10,
    max_registers: int = MAX_READ_REGISTERS,
    max_bits: int = MAX_READ_BITS,
) -> list[ReadRequest]:
    """Group ``spans`` into requests; raises ``ValueError`` for a span over the limit."""
    by_table: dict[str, list[Span]] = {}
    for span in spans:
        by_table.setdefault(span.table, []).append(span)
    requests: list[ReadRequest] = []
    for table in sorted(by_table, key=lambda t: TABLE_ORDER.index(t) if t in TABLE_ORDER else 99):
        limit = max_bits if table in BIT_TABLES else max_registers
        members: list[Span] = []
        start = end = 0
        for span in sorted(by_table[table], key=lambda s: (s.address, s.end)):
            if span.count > limit:
                raise ValueError(f"{span.key}: {span.count} {table}s exceed one request ({limit})")
            if members and span.address - end <= max_gap and max(end, span.end) - start <= limit:
                members.append(span)
                end = max(end, span.end)
                continue
            if members:
                requests.append(ReadRequest(table, start, end - start, tuple(members)))
            members, start, end = [span], span.address, span.end
        if members:
            requests.append(ReadRequest(table, start, end - start, tuple(members)))
    return requests
