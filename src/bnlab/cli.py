"""The ``bnlab`` command line."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import bnlab
from bnlab import distributed
from bnlab.runner import RunError

# `bench` options for --gpu only; all default to None (--strict too), so "given" means "not None".
_GPU_ONLY = (
    "out", "check", "against", "strict", "markdown", "device", "budget_s", "providers", "bnlab_backend",
    "warm_jobs", "knob",
)  # fmt: skip


def _cmd_bench(args: argparse.Namespace) -> int:
    from bnlab import bench

    if args.gpu:
        if args.rounds is not None or args.csv:
            print("bnlab bench: --rounds and --csv are for the CPU bench; with --gpu use --out DIR", file=sys.stderr)
            return 2
        from bnlab import gpubench

        return gpubench.run_cli(args)
    given = [f"--{name.replace('_', '-')}" for name in _GPU_ONLY if getattr(args, name) is not None]
    if given:
        print(f"bnlab bench: {', '.join(given)} only with --gpu", file=sys.stderr)
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


def _cmd_list(args: argparse.Namespace) -> int:
    from bnlab import experiments

    for name in experiments.names():
        exp = experiments.get(name)
        print(f"{name:<20} {exp.title}")
        print(f"{'':<20} profiles: {', '.join(exp.profiles)}; default seeds: {exp.default_seeds}")
    return 0


def _run_one(name: str, args: argparse.Namespace, overrides: Sequence[str]) -> Path:
    from bnlab import runner

    run_dir = runner.run_experiment(
        name,
        profile=args.profile,
        seeds=args.seeds,
        out=args.out,
        overrides=overrides,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        sync_bn=args.sync_bn,
    )
    if distributed.is_main():  # under torchrun, one copy of the output
        metrics = json.loads((run_dir / "metrics.json").read_text())
        print(f"{name} [{args.profile}, {len(metrics['seeds'])} seed(s)] -> {run_dir}")
        for v in metrics["verdicts"]:
            print(f"  {v['verdict']:<15} {v['claim']}\n  {'':<15} ours: {v['ours']}")
    return run_dir


def _cmd_run(args: argparse.Namespace) -> int:
    _run_one(args.name, args, args.overrides)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from bnlab.report import build_report

    html_path, md_path = build_report(args.runs_dir, out=args.out, profile=args.profile)
    print(f"report: {html_path}\n        {md_path}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from bnlab import experiments
    from bnlab.report import build_report

    started = time.perf_counter()
    for name in experiments.names():
        _run_one(name, args, ())
    title = f"bnlab reproduction ({args.profile})"
    html_path, md_path = distributed.on_main(build_report, args.out, profile=args.profile, title=title)
    if distributed.is_main():
        print(f"report: {html_path}\n        {md_path}\nwall time {time.perf_counter() - started:.0f} s")
    return 0


def _load_model(spec: str, checkpoint: str | None):
    import importlib

    module_name, _, attr = spec.partition(":")
    if not attr:
        raise RunError(f"MODEL must be 'package.module:callable', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RunError(f"cannot load {spec!r}: {exc}") from exc
    model = factory()
    if checkpoint:
        import torch

        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # a bnlab training checkpoint
        model.load_state_dict(state)
    return model


def _cmd_doctor(args: argparse.Namespace) -> int:
    from bnlab import datasets
    from bnlab.tools.doctor import doctor

    model = _load_model(args.model, args.checkpoint)
    if args.eval:
        model.eval()
    x, _ = datasets.load_tensors(args.dataset, args.split, data_dir=args.data_dir, flatten=not args.image)
    batches = [x[i : i + args.batch_size] for i in range(0, len(x) - args.batch_size + 1, args.batch_size)]
    report = doctor(model, batches, num_batches=min(args.batches, len(batches)))
    print(report.format())
    return 1 if any(f.severity == "problem" for f in report.findings) else 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="quick", help="smoke (tests), quick (default; 2 CPU cores), full (paper scale)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the profile's)")
    p.add_argument("--out", default="runs", help="folder of runs (default: runs)")
    p.add_argument(
        "--data-dir", default=None, help="folder with the dataset's IDX files (default: search, then download)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: BN statistics over the global batch (SyncBatchNorm), as in a single process; "
        "without it each process's BN uses its own share (plain DDP). No effect in a single process",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnlab", description="Batch Normalization: the layer, fast, and reproduced.")
    parser.add_argument("--version", action="version", version=f"bnlab {bnlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("bench", help="time bnlab's layers against torch.nn.BatchNorm (CPU; --gpu: on a GPU)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer shapes and rounds (about half a minute); with --gpu: batch 256, bf16 and fp32, forward+backward",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 15 quick, 60 full)")
    p.add_argument("--backends", default="native,reference", help="comma-separated bnlab backends to time")
    p.add_argument("--csv", default=None, help="where to write the CSV (default runs/bench/cpu-<time>.csv)")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="GPU benchmark: ResNet-50's BN shapes and more, bnlab-triton vs torch eager and torch.compile "
        "(see bnlab.gpubench); prints per-iteration sums and the acceptance check",
    )
    p.add_argument("--out", default=None, help="--gpu: folder for the CSV (default benchmarks/results)")
    p.add_argument("--check", metavar="CSV", default=None, help="--gpu: sums and acceptance check of a saved CSV")
    p.add_argument(
        "--against",
        metavar="CSV",
        default=None,
        help="--gpu: also compare bnlab's times, row by row and per-iteration sum, with a saved earlier run",
    )
    p.add_argument(
        "--strict", action="store_true", default=None, help="--gpu: exit status 1 if an acceptance criterion fails"
    )
    p.add_argument(
        "--markdown",
        action="store_true",
        default=None,
        help="--gpu: also print the README's tables (ResNet-50 at batch 256, forward+backward) in Markdown",
    )
    p.add_argument("--device", default=None, help="--gpu: torch device (default cuda; cpu is for tests)")
    p.add_argument(
        "--budget-s", type=float, default=None, help="--gpu: start no new group after this many seconds (default 480)"
    )
    p.add_argument(
        "--providers", default=None, help="--gpu: comma-separated, from bnlab-triton,torch-eager,torch-compile"
    )
    p.add_argument("--bnlab-backend", default=None, help="--gpu: the bnlab backend of bnlab-triton (default triton)")
    p.add_argument(
        "--knob",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="--gpu: set a Triton kernel knob for the run (repeatable; e.g. TILE=8192, TILE_BYTES=16384; "
        "see bnlab.kernels.batchnorm); recorded in the CSV",
    )
    p.add_argument(
        "--warm-jobs",
        type=int,
        default=None,
        help="--gpu: compile every group's kernels in this many processes first (default 0: compile as it goes)",
    )
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("list", help="list the experiments")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="run (or resume) one experiment")
    p.add_argument("name", help="experiment name (see `bnlab list`)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    _add_run_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("report", help="build the HTML and Markdown report from a folder of runs")
    p.add_argument("runs_dir", nargs="?", default="runs", help="folder of runs (default: runs)")
    p.add_argument("--out", default=None, help="where to write report.html/report.md (default: RUNS_DIR)")
    p.add_argument("--profile", default=None, help="only runs of this profile")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("doctor", help="diagnose the BN layers of a model on data (exit 1 if a problem is found)")
    p.add_argument("model", help="'package.module:callable' returning the model, e.g. bnlab.models:fig1_mlp")
    p.add_argument("--checkpoint", default=None, help="a state_dict (or bnlab checkpoint) to load into it")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default) or mnist")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's IDX files")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="batches to pass through a copy of the model")
    p.add_argument("--image", action="store_true", help="feed (N, 1, 28, 28) images instead of flat vectors")
    p.add_argument("--eval", action="store_true", help="put the model in eval mode first (as deployed)")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("reproduce", help="run every experiment, then the report")
    _add_run_options(p)
    p.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after the options; argparse alone takes them only before.
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "rounds", None) is not None and args.rounds < 1:
        print("bnlab: --rounds must be at least 1", file=sys.stderr)
        return 2
    from bnlab.config import ConfigError
    from bnlab.datasets import DatasetError

    # Under torchrun (`torchrun --nproc_per_node=N -m bnlab.cli run ...`) each process joins the world here;
    # in a plain process this does nothing. Only these commands train.
    joined, ended = args.command in ("run", "reproduce") and distributed.init_from_env(), False
    try:
        code = int(args.func(args))
    except (ConfigError, DatasetError, RunError, KeyError, FileNotFoundError, distributed.DataParallelError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        # Every rank says it: torchrun stops the others as soon as one worker exits, so a rank 0 that waited
        # for its turn could be killed before it spoke. Ranks other than 0 name themselves.
        where = "" if distributed.is_main() else f" [rank {distributed.rank()}]"
        print(f"bnlab {args.command}{where}: {message}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    finally:
        if joined:
            ended = distributed.shutdown()  # False if the group was someone else's (main() called in-process)
    if ended:
        distributed.exit_now(code)  # a torchrun worker that made its group: see exit_now for the abort it avoids
    return code


if __name__ == "__main__":
    sys.exit(main())
