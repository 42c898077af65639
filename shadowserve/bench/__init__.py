"""Benchmark suites behind `shadowserve bench` (each prints a table; --json writes its numbers)."""
