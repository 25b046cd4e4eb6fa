"""Benchmarks for the metering pipeline; run ``python -m bench --help``.

Each benchmark prints its figures next to a baseline measured in the same run,
and the ratio between them. BENCHMARKS.md records the results and the machine.
"""
