"""The ``bnlab`` command line."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Sequence
from pathlib import Path

import bnlab


def _cmd_bench(args: argparse.Namespace) -> int:
    from bnlab import bench

    if args.gpu:
        print("bnlab bench: --gpu needs the Triton backend, which is not in this version yet", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for name in backends:
        if name not in bnlab.available_backends() or name == "auto":
            choices = ", ".join(b for b in bnlab.available_backends() if b != "auto")
            print(f"bnlab bench: --backends: unknown backend {name!r}; choose from {choices}", file=sys.stderr)
            return 2
    rows = bench.run_bench(quick=args.quick, backends=backends, rounds=args.rounds)
    print(bench.format_table(rows))
    print()
    print(bench.summary(rows))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(args.csv) if args.csv else Path("runs") / "bench" / f"cpu-{stamp}.csv"
    print(f"CSV: {bench.write_csv(rows, path)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnlab", description="Batch Normalization: the layer, fast, and reproduced.")
    parser.add_argument("--version", action="version", version=f"bnlab {bnlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("bench", help="time bnlab's layers against torch.nn.BatchNorm (CPU)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and rounds (about half a minute)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 15 quick, 60 full)")
    p.add_argument("--backends", default="native,reference", help="comma-separated bnlab backends to time")
    p.add_argument("--csv", default=None, help="where to write the CSV (default runs/bench/cpu-<time>.csv)")
    p.add_argument("--gpu", action="store_true", help="GPU benchmark (needs the Triton backend; not yet)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rounds", None) is not None and args.rounds < 1:
        print("bnlab: --rounds must be at least 1", file=sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
