"""A resumable training loop for in-memory classification data.

Resumption is exact: the batch order of step s is a function of (data_seed, s) alone, and a checkpoint
taken at every evaluation holds the model, the optimizer, the torch RNG state, the step, the history and
the elapsed time. A run killed at any moment and started again continues from its last checkpoint and
ends with the same numbers, bit for bit (same machine, same thread count), as one never interrupted.

Data-parallel training: when `bnlab.distributed` is active (torchrun, more than one rank), the model is
wrapped in ``DistributedDataParallel`` and each rank trains on its contiguous share of the SAME global batch
`BatchOrder` yields at that step, so the examples seen per step, and the gradient (DDP averages the ranks'
gradients of their equal shares' mean losses: the gradient of the global batch's mean loss), are those of a
single-process run up to the order of floating-point sums. BN layers normalize with their rank's share
(per-device statistics, as with plain DDP) unless `sync_bn` converts them to `bnlab.nn.SyncBatchNorm`
(statistics of the global batch, as in a single process). Every rank evaluates (on the same weights, and on
rank 0's BN buffers, broadcast first) and so returns the same history; only rank 0 writes the checkpoint.
The checkpoint holds the unwrapped model's ``state_dict``, so single-process and data-parallel runs resume
each other's checkpoints (resumption is bit for bit only with the same world size and machine).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab import distributed
from bnlab.fileio import save_torch
from bnlab.nn.sync import SyncBatchNorm, to_sync

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
    sync_bn: bool = False,
) -> dict[str, Any]:
    """Train with cross-entropy for `steps` steps; evaluate at step 0, every `eval_every` steps and at the end.

    Returns {"history": [{"step", "train_loss", **evaluate(model)}, ...], "elapsed_s": float}. Resumes from
    `checkpoint` if it exists (the model and optimizer must be built the same way as in the first run).
    A non-finite loss does not stop training: it is recorded, as a diverging run is a result too.
    `lr_at(step)`, if given, sets every parameter group's learning rate before each step (a function of the
    step alone, so resumption needs no scheduler state).

    Under torchrun (`bnlab.distributed` active), training is data-parallel as the module docstring says:
    `batch_size` is the global batch and must be divisible by the world size (else `DataParallelError`,
    raised on every rank before any communication); with `sync_bn`, the model's BatchNorm1d/2d/3d layers are
    converted in place to `bnlab.nn.SyncBatchNorm` (the same parameter tensors, so `optimizer` still holds
    them). The recorded ``train_loss`` is the mean over ranks, i.e. over the global batch. The result gets
    ``"data_parallel": {"world_size", "sync_bn", "per_device_bn"}``, the last naming the BN layers left
    normalizing with their rank's share. In a single process `sync_bn` does nothing: every layer already
    sees the global batch.
    """
    parallel = distributed.active()
    share, record = slice(None), {}
    if parallel:
        model, share, record = _prepare_data_parallel(model, batch_size, sync_bn)
    order = BatchOrder(len(inputs), batch_size, data_seed)
    if parallel:
        state = _load_agreed(checkpoint)
    else:
        state = torch.load(checkpoint, weights_only=False) if checkpoint.exists() else None

    def evaluate_now() -> dict[str, Any]:
        if parallel:  # without SyncBatchNorm each rank's BN buffers saw its own share; use rank 0's everywhere
            _broadcast_buffers(model)
        return _evaluate(model, evaluate)

    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, history, elapsed = state["step"], state["history"], state["elapsed_s"]
        on_steps(step)
    else:
        step, history, elapsed = 0, [{"step": 0, "train_loss": None, **evaluate_now()}], 0.0
    # CPU modules take no device_ids; for a single-device CUDA module None means "its device", as wanted.
    net = nn.parallel.DistributedDataParallel(model) if parallel else model
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
        distributed.on_main(save)  # in a single process just save(); data-parallel: rank 0 writes, all wait
    loss_sum, loss_count = 0.0, 0
    while step < steps:
        net.train()
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        idx = order.indices(step)
        if parallel:
            idx = idx[share]
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(inputs[idx]), targets[idx])
        loss.backward()
        optimizer.step()
        step += 1
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        on_steps(1)
        if step % eval_every == 0 or step == steps:
            # One all-reduce per evaluation, not per step: the mean over ranks of each rank's mean over the
            # steps is the mean over the steps of the global batch's loss (the shares are equal).
            train_loss = distributed.mean_over_ranks(loss_sum / loss_count)
            history.append({"step": step, "train_loss": train_loss, **evaluate_now()})
            loss_sum, loss_count = 0.0, 0
            distributed.on_main(save)
    result: dict[str, Any] = {"history": history, "elapsed_s": elapsed + time.perf_counter() - started}
    if parallel:
        result["data_parallel"] = record
    return result


def _prepare_data_parallel(model: nn.Module, batch_size: int, sync_bn: bool) -> tuple[nn.Module, slice, dict]:
    """Check the batch splits evenly, convert BN layers if asked; (model, this rank's share, the record)."""
    world, rank = distributed.world_size(), distributed.rank()
    if batch_size % world:
        raise distributed.DataParallelError(
            f"the global batch size {batch_size} is not divisible by the world size {world}: each process trains "
            f"on an equal share of every batch (so that the averaged gradient is that of the global batch); "
            f"run on a number of processes that divides {batch_size}, or choose a batch size divisible by {world}"
        )
    if sync_bn:
        model = to_sync(model, inplace=True)
    per_device = [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm))
    ]
    per = batch_size // world
    record = {"world_size": world, "sync_bn": sync_bn, "per_device_bn": per_device}
    return model, slice(rank * per, (rank + 1) * per), record


def _load_agreed(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint every rank resumes from (None: start over), read by every rank from the shared file."""
    distributed.barrier()  # whatever rank 0 wrote before is complete before anyone looks
    state = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint.exists() else None
    # Also the point after which rank 0 may overwrite the file: every rank has read it.
    distributed.check_agree(None if state is None else state["step"], f"the step to resume {checkpoint} from")
    return state


def _broadcast_buffers(model: nn.Module) -> None:
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def _evaluate(model: nn.Module, evaluate: Evaluate) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return evaluate(model)
    finally:
        model.train(was_training)
