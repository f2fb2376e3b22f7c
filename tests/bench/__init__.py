"""Benchmarks: `python -m tests.bench` runs them all (tables on stdout, JSON under var/bench/)."""
