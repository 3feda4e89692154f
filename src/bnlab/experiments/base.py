"""What an experiment is: a claim, a typed config with profiles, units of work, and how to judge them.

The runner (`bnlab.runner`) owns directories, seeds, resumption and records; an experiment only says what
to compute for one (seed, arm) unit, how to summarize the units, which verdicts follow, and what to plot.
Analysis (`summarize`, `verdicts`, `figures`) works on saved unit results only, so it can be re-run
without training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bnlab.train import train_classifier

__all__ = ["VERDICTS", "Experiment", "UnitContext", "Verdict"]

VERDICTS = ("reproduced", "partly", "not reproduced")


@dataclass(frozen=True)
class Verdict:
    """One claim of the paper, its number, ours, and whether ours supports it (with the reason)."""

    claim: str
    paper: str
    ours: str
    verdict: str
    reason: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class UnitContext:
    """What a unit of work gets from the runner."""

    directory: Path  # the unit's own folder: checkpoints and anything else it wants to keep
    data_dir: Path | None  # an explicit dataset folder (--data-dir), else the loader's search order
    progress: Callable[[int], None] = field(default=lambda n: None)  # advance the progress bar by n steps
    cache: dict[str, Any] = field(default_factory=dict)  # shared between the units of one run (e.g. data)
    # --sync-bn: `train` passes it on to `train_classifier`, which converts the model's BN layers to
    # SyncBatchNorm in data-parallel runs (a no-op in a single process); the runner checks it arrived.
    sync_bn: bool = False

    @property
    def checkpoint(self) -> Path:
        return self.directory / "checkpoint.pt"

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        **options: Any,
    ) -> dict[str, Any]:
        """`train_classifier` with this unit's checkpoint, progress bar and --sync-bn filled in."""
        return train_classifier(
            model, optimizer, inputs, targets,
            checkpoint=self.checkpoint, on_steps=self.progress, sync_bn=self.sync_bn, **options,
        )  # fmt: skip


class Experiment(ABC):
    """Subclass, set the class attributes, implement the methods, and decorate with `@register`.

    The module docstring of an experiment states the claim being tested and the paper's number.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]  # the citation
    Config: ClassVar[type]
    profiles: ClassVar[dict[str, dict[str, Any]]]  # smoke (tests), quick (2 CPU cores), full (paper scale)
    default_seeds: ClassVar[dict[str, int]] = {"smoke": 1, "quick": 3, "full": 5}

    @abstractmethod
    def arms(self, config: Any) -> list[str]:
        """The variants compared (e.g. ["baseline", "bn"]); each is trained once per seed."""

    @abstractmethod
    def unit_steps(self, config: Any) -> int:
        """Training steps of one unit, for the progress bar."""

    @abstractmethod
    def run_unit(self, config: Any, seed: int, arm: str, ctx: UnitContext) -> dict[str, Any]:
        """Train and evaluate one arm with one seed; return a JSON-able result. Must resume from ctx.checkpoint."""

    @abstractmethod
    def summarize(self, config: Any, results: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """Aggregate results[seed][arm] into a JSON-able summary (means and stds over seeds)."""

    @abstractmethod
    def verdicts(self, config: Any, summary: dict[str, Any]) -> list[Verdict]:
        """Judge each claim from the summary."""

    @abstractmethod
    def figures(self, config: Any, summary: dict[str, Any]) -> dict[str, Any]:
        """Matplotlib figures by file stem, drawn from the summary alone."""

    def tables(self, config: Any, summary: dict[str, Any]) -> list[dict[str, Any]]:
        """Optional tables for the report: [{"title": str, "columns": [...], "rows": [[...], ...]}]."""
        return []

    def description(self) -> str:
        """The claim and setup, from the experiment module's docstring."""
        import sys

        return (sys.modules[type(self).__module__].__doc__ or "").strip()
