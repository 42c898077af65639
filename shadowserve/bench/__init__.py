"""Benchmarks behind `shadowserve bench` (each prints a table; --json writes its numbers).

``suites/``: one module per suite (``shadowserve bench SUITE``); ``common/``: what they share
(drivers, harness, metrics, plots, workloads, codec flags, machine info), which never imports a suite.
"""
