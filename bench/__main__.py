"""`python -m bench [--quick] [NAME ...]`: run the benchmarks and print a table."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
from pathlib import Path

from bench.harness import Row


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller inputs")
    parser.add_argument("names", nargs="*", help="modules to run, e.g. shamir merkle")
    args = parser.parse_args()
    here = Path(__file__).parent
    modules = sorted(
        m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )
    if args.names:
        modules = [m for m in modules if m.removeprefix("bench_") in args.names]
    print(
        f"# keyquorum benchmarks on {platform.python_implementation()} {platform.python_version()}"
    )
    print("| operation | rate | baseline (same run) | baseline rate | ratio |")
    print("|---|---:|---|---:|---:|")
    for name in modules:
        rows: list[Row] = importlib.import_module(f"bench.{name}").run(args.quick)
        for r in rows:
            print(
                f"| {r.name} | {r.rate:,.0f} {r.unit} | {r.baseline_name} | "
                f"{r.baseline_rate:,.0f} {r.unit} | {r.ratio:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
