"""Helpers for the tests, the benchmarks and the chaos harness; never in the wheel."""
