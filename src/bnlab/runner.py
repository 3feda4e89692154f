"""Run experiments: resolve the config, train every (seed, arm) unit with resumption, then analyze and record.

A run lives in ``<out>/<experiment>/<profile>`` (plus ``-<hash>`` of the overrides, if any), so running the
same command again finds the same folder: finished units are read back, an interrupted one resumes from
its checkpoint, and the analysis is redone from the saved results. Layout::

    config.json            resolved config, profile, overrides (checked on every later run)
    provenance.json        machine, versions, git revision (of the latest invocation)
    seed-<k>/<arm>/        checkpoint.pt while training, result.json when done
    metrics.json           summary over the requested seeds, verdicts, paper, run time
    <figure>.png           the experiment's figures
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bnlab import experiments
from bnlab.config import config_digest, config_to_dict, parse_overrides, resolve_config
from bnlab.experiments.base import Experiment, UnitContext
from bnlab.fileio import atomic_write, read_json, write_json
from bnlab.provenance import provenance

__all__ = ["RunError", "run_dir_for", "run_experiment"]


class RunError(RuntimeError):
    """A run that cannot proceed as asked (e.g. its folder holds a different config)."""


def run_dir_for(out: Path, name: str, profile: str, overrides: Mapping[str, str]) -> Path:
    suffix = f"-{config_digest(dict(overrides))}" if overrides else ""
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
) -> Path:
    """Run (or resume, or re-analyze) one experiment; returns its run folder."""
    exp: Experiment = experiments.get(name)
    if profile not in exp.profiles:
        raise RunError(f"{name}: unknown profile {profile!r}; choose one of {', '.join(exp.profiles)}")
    textual = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    config = resolve_config(exp.Config, exp.profiles[profile], textual)
    n_seeds = seeds if seeds is not None else exp.default_seeds[profile]
    if n_seeds < 1:
        raise RunError(f"{name}: --seeds must be at least 1, got {n_seeds}")
    run_dir = run_dir_for(Path(out), name, profile, textual)
    record = {"experiment": name, "profile": profile, "overrides": textual, "config": config_to_dict(config)}
    _claim_run_dir(run_dir, record)
    write_json(run_dir / "provenance.json", provenance())

    arms = exp.arms(config)
    units = [(seed, arm) for seed in range(n_seeds) for arm in arms]
    bar = _Progress(len(units) * exp.unit_steps(config), f"{name} [{profile}]", progress)
    cache: dict[str, Any] = {}
    results: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        for seed, arm in units:
            unit_dir = run_dir / f"seed-{seed}" / arm
            done = unit_dir / "result.json"
            bar.note(f"seed {seed} {arm}")
            if done.exists():
                result = read_json(done)
                bar(exp.unit_steps(config))
            else:
                ctx = UnitContext(
                    directory=unit_dir, data_dir=Path(data_dir) if data_dir else None, progress=bar, cache=cache
                )
                unit_dir.mkdir(parents=True, exist_ok=True)
                result = exp.run_unit(config, seed, arm, ctx)
                write_json(done, result)
                ctx.checkpoint.unlink(missing_ok=True)  # the result supersedes it
            results.setdefault(seed, {})[arm] = result
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: run the same command again to resume ({run_dir})", file=sys.stderr)
        raise
    bar.close()
    analyze(exp, config, run_dir, results, record)
    return run_dir


def _claim_run_dir(run_dir: Path, record: dict[str, Any]) -> None:
    """Write config.json, or check that the folder was made for the same config (never mix two configs)."""
    path = run_dir / "config.json"
    if path.exists():
        existing = read_json(path)
        if existing != record:
            changed = sorted(k for k in record["config"] if existing.get("config", {}).get(k) != record["config"][k])
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
