"""Micro-benchmarks run by `make bench`.

Each `bench_*.py` module exposes `run(quick: bool) -> list[Row]`. Every row
carries a baseline measured in the same run (this machine is shared and
noisy), and the table prints the ratio beside the absolute figures.
"""
