"""Benchmarks for fanout: load generator, peers, side-by-side runner, perf gate.

Nothing here is collected by the test run (no ``test_`` file names).
"""
