"""A resumable training loop for in-memory classification data.

Resumption is exact: the batch order of step s is a function of (data_seed, s) alone, and a checkpoint
taken at every evaluation holds the model, the optimizer, the torch RNG state, the step, the history and
the elapsed time. A run killed at any moment and started again continues from its last checkpoint and
ends with the same numbers, bit for bit (same machine, same thread count), as one never interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.fileio import save_torch

__all__ = ["BatchOrder", "train_classifier"]

Evaluate = Callable[[nn.Module], dict[str, Any]]


class BatchOrder:
    """Shuffled mini-batches without replacement; epoch e uses a permutation seeded by (seed, e).

    Each epoch drops its last incomplete batch, so every step sees exactly `batch_size` examples.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if not 0 < batch_size <= num_examples:
            raise ValueError(f"batch_size must be in [1, {num_examples}] (the number of examples), got {batch_size}")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=gen)
        start = position * self.batch_size
        return self._perm[start : start + self.batch_size]


def train_classifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    data_seed: int,
    eval_every: int,
    evaluate: Evaluate,
    checkpoint: Path,
    on_steps: Callable[[int], None] = lambda n: None,
    lr_at: Callable[[int], float] | None = None,
) -> dict[str, Any]:
    """Train with cross-entropy for `steps` steps; evaluate at step 0, every `eval_every` steps and at the end.

    Returns {"history": [{"step", "train_loss", **evaluate(model)}, ...], "elapsed_s": float}. Resumes from
    `checkpoint` if it exists (the model and optimizer must be built the same way as in the first run).
    A non-finite loss does not stop training: it is recorded, as a diverging run is a result too.
    `lr_at(step)`, if given, sets every parameter group's learning rate before each step (a function of the
    step alone, so resumption needs no scheduler state).
    """
    order = BatchOrder(len(inputs), batch_size, data_seed)
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, history, elapsed = state["step"], state["history"], state["elapsed_s"]
        on_steps(step)
    else:
        step, history, elapsed = 0, [{"step": 0, "train_loss": None, **_evaluate(model, evaluate)}], 0.0
    started = time.perf_counter()

    def save() -> None:
        save_torch(
            checkpoint,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "step": step,
                "history": history,
                "elapsed_s": elapsed + time.perf_counter() - started,
            },
        )

    if step == 0:
        save()
    loss_sum, loss_count = 0.0, 0
    while step < steps:
        model.train()
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        idx = order.indices(step)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(inputs[idx]), targets[idx])
        loss.backward()
        optimizer.step()
        step += 1
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        on_steps(1)
        if step % eval_every == 0 or step == steps:
            history.append({"step": step, "train_loss": loss_sum / loss_count, **_evaluate(model, evaluate)})
            loss_sum, loss_count = 0.0, 0
            save()
    return {"history": history, "elapsed_s": elapsed + time.perf_counter() - started}


def _evaluate(model: nn.Module, evaluate: Evaluate) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return evaluate(model)
    finally:
        model.train(was_training)
