"""Shamir split and combine, 5-of-7 of a 32-byte master key.

Baselines, measured in the same run, isolate what the commitments and
checks cost on top of the field arithmetic:
- combine against raw `gf256.interpolate` of 5 points of 32 bytes at x=0
  (no salt, no per-share commitments, no secret commitment, no checks);
- split against raw `gf256.evaluate` of a degree-4 polynomial of 32-byte
  coefficients at x = 1..7 (the arithmetic of a split without salt or
  commitments);
- hashlib.sha256 of 64 bytes is an absolute yardstick row (one commitment
  hash is about that size), against the raw interpolation.
"""

from __future__ import annotations

import hashlib
import secrets

from bench.harness import Row, ops_per_second
from keyquorum.quorum import gf256, shamir

THRESHOLD = 5
COUNT = 7
SECRET_SIZE = 32


def run(quick: bool) -> list[Row]:
    min_time = 0.05 if quick else 0.3
    rounds = 3 if quick else 5
    secret = secrets.token_bytes(SECRET_SIZE)
    shares, commitments = shamir.split(secret, THRESHOLD, COUNT)
    chosen = shares[:THRESHOLD]
    coefficients = [secrets.token_bytes(SECRET_SIZE) for _ in range(THRESHOLD)]
    points = [(x, gf256.evaluate(coefficients, x)) for x in range(1, THRESHOLD + 1)]
    sha_input = secrets.token_bytes(64)

    def raw_split() -> None:
        for x in range(1, COUNT + 1):
            gf256.evaluate(coefficients, x)

    def raw_interpolate() -> None:
        gf256.interpolate(points, 0)

    split_rate = ops_per_second(
        lambda: shamir.split(secret, THRESHOLD, COUNT), min_time=min_time, rounds=rounds
    )
    raw_split_rate = ops_per_second(raw_split, min_time=min_time, rounds=rounds)
    combine_rate = ops_per_second(
        lambda: shamir.combine(chosen, commitments), min_time=min_time, rounds=rounds
    )
    raw_interpolate_rate = ops_per_second(raw_interpolate, min_time=min_time, rounds=rounds)
    sha_rate = ops_per_second(
        lambda: hashlib.sha256(sha_input).digest(), min_time=min_time, rounds=rounds
    )
    raw_name = f"raw gf256.interpolate {THRESHOLD} points, {SECRET_SIZE} B, no commitments"
    return [
        Row(
            name=f"shamir.split {THRESHOLD}-of-{COUNT}, {SECRET_SIZE} B secret",
            rate=split_rate,
            baseline_name=(
                f"raw gf256.evaluate degree {THRESHOLD - 1} at {COUNT} points, "
                f"{SECRET_SIZE} B, no salt or commitments"
            ),
            baseline_rate=raw_split_rate,
        ),
        Row(
            name=f"shamir.combine {THRESHOLD}-of-{COUNT}, {SECRET_SIZE} B secret",
            rate=combine_rate,
            baseline_name=raw_name,
            baseline_rate=raw_interpolate_rate,
        ),
        Row(
            name="hashlib.sha256 of 64 B (yardstick)",
            rate=sha_rate,
            baseline_name=raw_name,
            baseline_rate=raw_interpolate_rate,
        ),
    ]
