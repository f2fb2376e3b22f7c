"""Run the benchmarks: `python -m tests.bench [--only engine|audit] [--repeats N] [--warmups N]`.

Without --only, the engine benchmark runs first, then the audit-log benchmark.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.bench import audit, engine
from tests.support import REPO

BENCHMARKS = ("engine", "audit")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "--only", choices=BENCHMARKS, help="run just this benchmark (default: all, in order)"
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="engine: measured runs per side (default 15)"
    )
    parser.add_argument(
        "--warmups", type=int, default=2, help="engine: unmeasured runs per side first (default 2)"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "var" / "bench", help="report folder (var/bench)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmups < 0:
        parser.error("--repeats must be at least 1 and --warmups at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [args.only] if args.only else list(BENCHMARKS)
    if "engine" in chosen:
        engine.run(repeats=args.repeats, warmups=args.warmups, out_dir=args.out)
    if "audit" in chosen:
        if "engine" in chosen:
            print()
        audit.run(out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
