"""Time to compute the Dataset page's statistics on the real 30,000-row train.csv.

Benchmark 5 of docs/benchmarks.md: `core.eda.dataset_statistics`, median of --repeats runs.

    python -m benchmarks.dataset_statistics [--repeats 7]
"""

from __future__ import annotations

import argparse
import timeit

from benchmarks.common import CAPTIONS_CSV, machine, median
from core import eda


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not CAPTIONS_CSV.is_file():
        raise SystemExit(f"{CAPTIONS_CSV} not found; this benchmark needs the real train.csv in ../shared/data")
    print(f"machine: {machine()}")
    root = CAPTIONS_CSV.parent
    statistics = eda.dataset_statistics(root)
    times = timeit.repeat(lambda: eda.dataset_statistics(root), number=1, repeat=args.repeats)
    print(f"5. Dataset page statistics for {len(statistics.records):,} rows: median {median(times):.2f} s "
          f"(min {min(times):.2f} s, {args.repeats} runs)")


if __name__ == "__main__":
    main()
