"""``python -m benchmarks``: argument parsing only; the work is in ``benchmarks.runner``."""

from __future__ import annotations

import argparse
import logging
import sys

from .harness import SUITES, Config, usable_cores


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure statepool against raw asyncio, concurrent.futures, loky, "
                    "aiomultiprocess, joblib and Dask on this machine.")
    parser.add_argument("--quick", action="store_true",
                        help="every suite small, in under a minute (for CI)")
    parser.add_argument("--suite", action="append", choices=SUITES, metavar="NAME",
                        help=f"run this suite only (repeatable); one of: {', '.join(SUITES)}")
    parser.add_argument("--workers", type=int, default=usable_cores(), metavar="N",
                        help="pool sizes (default: the usable cores, %(default)s here)")
    parser.add_argument("--repetitions", type=int, metavar="N",
                        help="recorded repetitions per figure, after one warm-up "
                             "(default 5; 3 with --quick)")
    parser.add_argument("--wait-quiet", type=float, metavar="PCT",
                        help="before each row, wait (20 s at most) until other processes use "
                             "under PCT %% of the CPU: for shared machines")
    parser.add_argument("--json", metavar="PATH", help="write every figure with its repetitions")
    parser.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.repetitions is not None and args.repetitions < 1:
        parser.error("--repetitions must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # The suite's states are trivial on purpose: statepool's advice (cheap process states, states
    # in line on a pool) would only be noise here. Failures still show; the logging suite sets
    # the engine logger's level itself for its rows.
    logging.getLogger("statepool").setLevel(logging.ERROR)
    from .runner import run

    suites = tuple(s for s in SUITES if s in args.suite) if args.suite else SUITES
    repetitions = args.repetitions or (3 if args.quick else 5)
    cfg = Config(quick=args.quick, workers=args.workers, repetitions=repetitions,
                 suites=suites, figure_timeout_s=30.0 if args.quick else 180.0,
                 quiet_below_pct=args.wait_quiet)
    return run(cfg, args.json, args.plot)


if __name__ == "__main__":
    sys.exit(main())
