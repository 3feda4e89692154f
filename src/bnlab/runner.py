"""Run experiments: resolve the config, train every (seed, arm) unit with resumption, then analyze and record.

A run lives in ``<out>/<experiment>/<profile>`` (plus ``-<hash>`` of the overrides, if any), so running the
same command again finds the same folder: finished units are read back, an interrupted one resumes from
its checkpoint, and the analysis is redone from the saved results. Layout::

    config.json            resolved config, profile, overrides (checked on every later run)
    provenance.json        machine, versions, git revision (of the latest invocation)
    seed-<k>/<arm>/        checkpoint.pt while training, result.json when done
    metrics.json           summary over the requested seeds, verdicts, paper, run time
    <figure>.png           the experiment's figures

Data-parallel runs (torchrun, `bnlab.distributed` active with N > 1 ranks): every rank runs every unit (they
train it together, see `bnlab.train`); rank 0 alone writes the files and shows the progress bar, and the
other ranks wait for it where they need its files or its verdict (`bnlab.distributed.on_main`), so an
error on rank 0 (a folder holding another config, a full disk) stops every rank. Such a run lives in its
own folder, ``<profile>[-<hash>]-ddp<N>`` (``-ddp<N>-syncbn`` with ``sync_bn``), and its config.json
records ``"data_parallel": {"world_size": N, "sync_bn": ...}``; single-process folders and records are
exactly as before. Why not share the single-process folder, given that the batch order and the global
batch are the same: (1) without ``sync_bn`` every BN layer normalizes with 1/N of the batch, a different
experiment, not a rounding difference; (2) with it, only BatchNorm1d/2d/3d are synchronized, while other
layers with batch statistics (batch renorm and ghost BN, in `smallbatch`) keep per-device statistics and
running averages (the unit's result.json lists them under ``data_parallel.per_device_bn``); (3) even
where the mathematics agree, the sums run in another order, so a unit resumed in the other mode would no
longer end bit for bit as an uninterrupted one, and the folder's seeds would mix two computations. Separate
folders keep "a folder never mixes two configs" and exact resumption true, and put the two runs side by
side for comparison. N is part of the key because the per-device batch (and the rounding) depends on it.
``sync_bn`` in a single process changes nothing (every layer already sees the global batch) and uses the
ordinary folder.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnlab import distributed, experiments
from bnlab.config import config_digest, config_to_dict, parse_overrides, resolve_config
from bnlab.experiments.base import Experiment, UnitContext
from bnlab.fileio import atomic_write, read_json, write_json
from bnlab.provenance import provenance

__all__ = ["RunError", "run_dir_for", "run_experiment"]


class RunError(RuntimeError):
    """A run that cannot proceed as asked (e.g. its folder holds a different config)."""


def run_dir_for(
    out: Path, name: str, profile: str, overrides: Mapping[str, str], world_size: int = 1, sync_bn: bool = False
) -> Path:
    """The run's folder: by experiment, profile, overrides and, for data-parallel runs, N and sync_bn."""
    suffix = f"-{config_digest(dict(overrides))}" if overrides else ""
    if world_size > 1:
        suffix += f"-ddp{world_size}" + ("-syncbn" if sync_bn else "")
    return Path(out) / name / f"{profile}{suffix}"


class _Progress:
    """A tqdm bar over all training steps of a run, or nothing when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            # In a log file (CI, nohup) a bar redrawn ten times a second is noise: redraw every 30 s there.
            interval = 0.1 if sys.stderr.isatty() else 30.0
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.05,
                mininterval=interval,
                maxinterval=max(10.0, interval),
            )

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_experiment(
    name: str,
    profile: str = "quick",
    seeds: int | None = None,
    out: Path | str = "runs",
    overrides: Sequence[str] | Mapping[str, str] = (),
    data_dir: Path | str | None = None,
    progress: bool = True,
    sync_bn: bool = False,
) -> Path:
    """Run (or resume, or re-analyze) one experiment; returns its run folder.

    Under torchrun every rank calls this with the same arguments (see the module docstring); `sync_bn`
    converts the experiment's BN layers to `bnlab.nn.SyncBatchNorm` in data-parallel training.
    """
    exp: Experiment = experiments.get(name)
    if profile not in exp.profiles:
        raise RunError(f"{name}: unknown profile {profile!r}; choose one of {', '.join(exp.profiles)}")
    textual = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    config = resolve_config(exp.Config, exp.profiles[profile], textual)
    n_seeds = seeds if seeds is not None else exp.default_seeds[profile]
    if n_seeds < 1:
        raise RunError(f"{name}: --seeds must be at least 1, got {n_seeds}")
    world = distributed.world_size()
    run_dir = run_dir_for(Path(out), name, profile, textual, world, sync_bn)
    record = {"experiment": name, "profile": profile, "overrides": textual, "config": config_to_dict(config)}
    if world > 1:
        record["data_parallel"] = {"world_size": world, "sync_bn": sync_bn}
    # In a single process on_main(f) is f(); data-parallel, rank 0 does it and every rank gets its outcome.
    distributed.on_main(_claim_run_dir, run_dir, record)
    distributed.on_main(_write_provenance, run_dir, world)

    arms = exp.arms(config)
    units = [(seed, arm) for seed in range(n_seeds) for arm in arms]
    bar = _Progress(len(units) * exp.unit_steps(config), f"{name} [{profile}]", progress and distributed.is_main())
    cache: dict[str, Any] = {}
    results: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        for seed, arm in units:
            unit_dir = run_dir / f"seed-{seed}" / arm
            done = unit_dir / "result.json"
            bar.note(f"seed {seed} {arm}")
            finished = done.exists()
            distributed.check_agree(finished, f"whether {done} exists")  # else ranks would train apart
            if finished:
                result = read_json(done)
                bar(exp.unit_steps(config))
            else:
                ctx = UnitContext(
                    directory=unit_dir,
                    data_dir=Path(data_dir) if data_dir else None,
                    progress=bar,
                    cache=cache,
                    sync_bn=sync_bn,
                )
                unit_dir.mkdir(parents=True, exist_ok=True)
                result = exp.run_unit(config, seed, arm, ctx)
                if world > 1:
                    _check_data_parallel(name, result, sync_bn)
                # Every rank's result has the same history; rank 0's is the one on disk.
                distributed.on_main(_finish_unit, done, result, ctx.checkpoint)
            results.setdefault(seed, {})[arm] = result
    except KeyboardInterrupt:
        bar.close()
        if distributed.is_main():
            print(f"\ninterrupted: run the same command again to resume ({run_dir})", file=sys.stderr)
        raise
    bar.close()
    # Every rank waits for rank 0's analysis, so metrics.json exists wherever this returns.
    distributed.on_main(analyze, exp, config, run_dir, results, record)
    return run_dir


def _write_provenance(run_dir: Path, world: int) -> None:
    record = provenance()
    if world > 1:  # rank 0's machine; the backend is how the ranks talk (not part of the config)
        import torch.distributed as dist

        record["data_parallel"] = {"world_size": world, "backend": str(dist.get_backend())}
    write_json(run_dir / "provenance.json", record)


def _finish_unit(done: Path, result: dict[str, Any], checkpoint: Path) -> None:
    write_json(done, result)
    checkpoint.unlink(missing_ok=True)  # the result supersedes it


def _check_data_parallel(name: str, result: dict[str, Any], sync_bn: bool) -> None:
    """Fail loudly if --sync-bn did not reach `train_classifier` (the run would silently use per-device BN)."""
    if sync_bn and not result.get("data_parallel", {}).get("sync_bn"):
        raise RunError(
            f"{name}: --sync-bn was given but the unit did not train with it; the experiment's run_unit must call "
            f"train_classifier(..., sync_bn=ctx.sync_bn) and return its result's 'data_parallel' record"
        )


def _claim_run_dir(run_dir: Path, record: dict[str, Any]) -> None:
    """Write config.json, or check that the folder was made for the same config (never mix two configs).

    The record includes ``data_parallel`` for a data-parallel run (and only then), so a single-process and a
    data-parallel run, or two world sizes, never share a folder (`run_dir_for` already keeps them apart).
    """
    path = run_dir / "config.json"
    if path.exists():
        existing = read_json(path)
        if existing != record:
            changed = sorted(k for k in record["config"] if existing.get("config", {}).get(k) != record["config"][k])
            changed += sorted(k for k in ("data_parallel",) if existing.get(k) != record.get(k))
            raise RunError(
                f"{run_dir} holds a run with a different config (keys differ: {', '.join(changed) or 'metadata'}); "
                f"pass another --out, or delete that folder to start over"
            )
        return
    write_json(path, record)


def analyze(
    exp: Experiment,
    config: Any,
    run_dir: Path,
    results: dict[int, dict[str, dict[str, Any]]],
    record: Mapping[str, Any],
) -> dict[str, Any]:
    """Summary, verdicts, figures and metrics.json, from the unit results alone."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    summary = exp.summarize(config, results)
    verdicts = exp.verdicts(config, summary)
    figure_names = []
    for stem, fig in exp.figures(config, summary).items():
        atomic_write(
            run_dir / f"{stem}.png", lambda f, fig=fig: fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        )
        plt.close(fig)
        figure_names.append(f"{stem}.png")
    train_seconds = sum(r.get("elapsed_s", 0.0) for arms in results.values() for r in arms.values())
    metrics = {
        **record,
        "title": exp.title,
        "paper": exp.paper,
        "description": exp.description(),
        "seeds": sorted(results),
        "summary": summary,
        "verdicts": [v.to_dict() for v in verdicts],
        "tables": exp.tables(config, summary),
        "figures": figure_names,
        "train_seconds": train_seconds,
        "analyzed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(run_dir / "metrics.json", metrics)
    return metrics
