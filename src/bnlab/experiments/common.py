"""Pieces every experiment uses: cached data, accuracy in chunks, mean/std records, verdict grading."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnlab.experiments.base import UnitContext

__all__ = ["Data", "accuracy", "cosine_lr", "grade", "load_data", "mean_std"]


@dataclass(frozen=True)
class Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    files: dict[str, str] | None  # where the test split was found, for the record


def cosine_lr(base: float, steps: int) -> Callable[[int], float]:
    """Learning rate at a step: cosine decay from `base` to 0 over `steps` (a stable final model to judge)."""
    return lambda step: 0.5 * base * (1.0 + math.cos(math.pi * step / steps))


def load_data(ctx: UnitContext, dataset: str, *, flatten: bool, image_size: int = 28) -> Data:
    """Both splits as float tensors, loaded once per run (kept in the run's shared cache). With
    `image_size` below 28 (and not flattened), images are average-pooled down to that size."""
    key = f"data:{dataset}:{'flat' if flatten else 'image'}:{image_size}"
    if key not in ctx.cache:
        from bnlab import datasets

        train_x, train_y = datasets.load_tensors(dataset, "train", data_dir=ctx.data_dir, flatten=flatten)
        test_x, test_y = datasets.load_tensors(dataset, "test", data_dir=ctx.data_dir, flatten=flatten)
        if image_size != 28:
            if flatten or 28 % image_size:
                raise ValueError(f"image_size must divide 28 and needs unflattened images, got {image_size}")
            train_x = nn.functional.avg_pool2d(train_x, 28 // image_size)
            test_x = nn.functional.avg_pool2d(test_x, 28 // image_size)
        found = datasets.locate(dataset, "test", data_dir=ctx.data_dir)
        files = {"folder": str(found.images.parent), "source": found.source} if found else None
        ctx.cache[key] = Data(train_x, train_y, test_x, test_y, files)
    return ctx.cache[key]


def accuracy(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000, *, whole_batches: bool = False
) -> float:
    """Fraction of correct predictions, `batch` examples at a time. With `whole_batches`, a last partial
    batch is left out (needed when the batch's own statistics normalize it, as in train mode)."""
    batch = min(batch, len(x))
    used = len(x) // batch * batch if whole_batches else len(x)
    correct = 0
    for start in range(0, used, batch):
        end = min(start + batch, used)
        correct += int((net(x[start:end]).argmax(1) == y[start:end]).sum())
    return correct / used


def mean_std(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """{"mean", "std", "n"} over seeds (population std: the spread of the seeds we ran)."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "n": int(array.size)}


def grade(full: bool, some: bool) -> str:
    """ "reproduced" if every check holds, "partly" if some do, else "not reproduced"."""
    if full:
        return "reproduced"
    return "partly" if some else "not reproduced"
