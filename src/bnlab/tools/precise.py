"""Precise BN: recompute every BN layer's population statistics with the weights fixed.

Training leaves an exponential moving average (EMA) of batch statistics in ``running_mean`` and
``running_var``. The EMA mixes statistics computed under many past weights, so it can be stale or noisy
(Wu & Johnson 2021, "Rethinking Batch in BatchNorm"). Ioffe & Szegedy's Algorithm 2 instead averages the
statistics of many mini-batches under the final weights. `precise_bn` does that for a whole model in one
pass over the data; `PopulationAccumulator` is its tensor-level core (per-channel sums for one layer).

Two estimators of the population variance (``estimator=``), both reported per channel in float64:

- ``"algorithm2"`` (default): Algorithm 2 with batches weighted by their size m_b (values per channel, batch
  size times spatial size), ``Var = sum_b m_b * s_b^2 / sum_b m_b`` where ``s_b^2`` is batch b's unbiased
  variance (divided by m_b - 1). Equals ``bnlab.reference.population_statistics`` on the same batches. It
  averages *within-batch* variances, which is what the layer sees when it normalizes in training.
- ``"total"``: the unbiased variance of all values pooled into one sample, ``sum (x - E[x])^2 / (M - 1)``
  over all M values. By the law of total variance it is the Algorithm 2 numerator plus the spread of the
  batch means: ``(M - 1) Var_total = sum_b (m_b - 1) s_b^2 + sum_b m_b (mu_b - E[x])^2``. fvcore calls it the
  "population variance" estimator and Wu & Johnson prefer it for small batches.

The mean ``E[x] = sum_b m_b mu_b / sum_b m_b`` is the mean of all values, so it does not depend on how the
data is split into batches. ``"total"`` does not either. ``"algorithm2"`` does: its within-batch variance
leaves out the spread of the batch means, so smaller batches give smaller estimates (a batch of 2 misses
half the variance). It is still unbiased for i.i.d. batches, because each s_b^2 is, and it does not
depend on the order of the batches or on how they are shared among ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from tqdm import tqdm

__all__ = ["ESTIMATORS", "LayerStatistics", "PopulationAccumulator", "default_forward", "precise_bn"]

ESTIMATORS = ("algorithm2", "total")


class PopulationAccumulator:
    """Per-channel statistics of a stream of (N, C, *) batches, accumulated in float64.

    The channel axis is axis 1; axis 0 and every trailing axis are reduced, so a batch holds
    m_b = numel / C values per channel. Keeps the number of batches and of values, the running mean and
    sum of squared deviations of all values (merged batch by batch, Chan et al.'s update, which does not
    cancel the way ``E[x^2] - E[x]^2`` does), and Algorithm 2's ``sum_b m_b * s_b^2``. Only this object
    changes; the batches are read, never written.
    """

    def __init__(self, num_channels: int, device: torch.device | str | None = None) -> None:
        device = torch.device("cpu" if device is None else device)
        # MPS has no float64; the sums are small (C values each), so keep them on the CPU there.
        self.device = torch.device("cpu") if device.type == "mps" else device
        self.num_channels = num_channels
        self.batches = 0
        self.count = 0
        self.mean = torch.zeros(num_channels, dtype=torch.float64, device=self.device)
        self.sum_sq_dev = torch.zeros_like(self.mean)  # sum over all values of (x - self.mean)^2
        self.weighted_unbiased_var = torch.zeros_like(self.mean)  # sum_b m_b * s_b^2

    def update(self, x: torch.Tensor, label: str = "batch") -> None:
        """Add one batch of shape (N, C, *); ``label`` names the layer in errors. An empty batch is skipped."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{label}: expected a tensor input, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"{label}: expected input of shape (N, {self.num_channels}, ...), got {tuple(x.shape)}")
        m = x.numel() // self.num_channels
        if m == 0:
            return  # BN leaves its statistics alone for an empty batch; so does Algorithm 2
        if m == 1:
            raise ValueError(
                f"{label}: a batch of shape {tuple(x.shape)} has one value per channel, and Algorithm 2 needs at "
                f"least 2 for an unbiased variance; use larger batches"
            )
        dims = [0, *range(2, x.dim())]
        x64 = x.detach().to(device=self.device, dtype=torch.float64)
        var_b, mean_b = torch.var_mean(x64, dim=dims, correction=0)
        sum_sq_dev_b = var_b * m
        total = self.count + m
        delta = mean_b - self.mean
        self.mean += delta * (m / total)
        self.sum_sq_dev += sum_sq_dev_b + delta.square() * (self.count * m / total)
        self.weighted_unbiased_var += sum_sq_dev_b * (m / (m - 1))
        self.count = total
        self.batches += 1

    def statistics(self, estimator: str = "algorithm2") -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean, var)``, each (C,) float64, with the variance from ``estimator`` (see the module doc)."""
        _check_estimator(estimator)
        if self.batches == 0:
            raise ValueError("PopulationAccumulator: got no batches with values")
        if estimator == "algorithm2":
            return self.mean.clone(), self.weighted_unbiased_var / self.count
        return self.mean.clone(), self.sum_sq_dev / (self.count - 1)


def _all_reduce_accumulators(accumulators: list[PopulationAccumulator]) -> None:
    """Sum the accumulators over all ranks of the default process group, in place; every rank must call it.

    Two collectives for all accumulators together: first the counts, the sums of values and Algorithm 2's
    sums, which give the global mean; then each rank's squared deviations re-centred on that mean.
    """
    if not accumulators:
        return
    device = accumulators[0].device
    counts = torch.tensor([[a.count, a.batches] for a in accumulators], dtype=torch.float64, device=device)
    sums = torch.cat([torch.stack((a.mean * a.count, a.weighted_unbiased_var)).to(device) for a in accumulators], 1)
    flat = torch.cat((counts.flatten(), sums.flatten()))
    dist.all_reduce(flat)
    counts, sums = flat[: counts.numel()].view_as(counts), flat[counts.numel() :].view(2, -1)
    recentred, start = [], 0
    for a, (count, _) in zip(accumulators, counts.tolist(), strict=True):
        global_mean = (sums[0, start : start + a.num_channels] / max(count, 1.0)).to(a.device)
        # A rank that saw no values for this layer has mean 0 and count 0: it adds nothing here.
        recentred.append((a.sum_sq_dev + a.count * (a.mean - global_mean).square()).to(device))
        start += a.num_channels
    deviations = torch.cat(recentred)
    dist.all_reduce(deviations)
    start = 0
    for a, (count, batches) in zip(accumulators, counts.tolist(), strict=True):
        chunk = slice(start, start + a.num_channels)
        a.count, a.batches = round(count), round(batches)
        a.mean = (sums[0, chunk] / max(count, 1.0)).to(a.device)
        a.weighted_unbiased_var = sums[1, chunk].to(a.device)
        a.sum_sq_dev = deviations[chunk].to(a.device)
        start += a.num_channels


@dataclass(frozen=True)
class LayerStatistics:
    """What `precise_bn` found for one BN layer (summed over ranks under torch.distributed).

    ``batches``: how many inputs the layer received (one per call: a layer called twice per forward counts
    two). ``values``: values per channel over all of them (sum of m_b). ``mean`` and ``var``: the population
    statistics in float64, shape (C,), before they were cast into the layer's buffers; None if the layer
    received no batch, in which case its statistics were left as they were.
    """

    batches: int
    values: int
    mean: torch.Tensor | None
    var: torch.Tensor | None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: a tuple or list (e.g. an ``(input, target)`` pair from a DataLoader) is
    called with its first element only, anything else as it is; a dict raises TypeError (pass ``forward``).
    """
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("precise_bn: got an empty tuple/list as a batch; pass forward= to say how to run it")
        return model(batch[0])
    if isinstance(batch, Mapping):
        raise TypeError(
            f"precise_bn: a batch is a dict with keys {sorted(map(str, batch))}; say how to run the model on it, "
            f"e.g. forward=lambda model, batch: model(batch['image'])"
        )
    return model(batch)


def precise_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 200,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    *,
    estimator: str = "algorithm2",
    progress: bool = False,
) -> dict[str, LayerStatistics]:
    """Recompute the running statistics of every BN layer in ``model`` from ``num_batches`` batches.

    Every ``torch.nn.modules.batchnorm._BatchNorm`` with running statistics is recomputed (torch's and
    bnlab's BatchNorm1d/2d/3d, SyncBatchNorm, subclasses); layers built with ``track_running_stats=False``
    have none and are skipped. Each layer's input is read by a forward pre-hook and accumulated in float64
    (`PopulationAccumulator`); its population mean and variance (``estimator``: ``"algorithm2"``, the default,
    equal to ``bnlab.reference.population_statistics`` on the same inputs, or ``"total"``; see the module
    docstring) are written into ``running_mean`` and ``running_var``. Batches are weighted by their number
    of values per channel (batch size times spatial size), so a short last batch counts for what it holds.

    How the network runs during the pass: the BN layers normalize with their *batch* statistics, as in
    training, and every other module is in eval mode (dropout off, as at inference). With batch statistics,
    layer k's input depends on the earlier layers only through their weights, which are fixed, so one pass
    gives every layer its statistics under the same conditions it was trained in; this is what Wu & Johnson's
    precise BN does. Running the earlier BN layers with their running statistics instead would make layer
    k's input depend on statistics this function is replacing (stale ones during the pass), and getting
    them right would need one pass per layer. Everything runs under ``torch.no_grad``.

    Args:
        model: the model; its BN layers' ``running_mean`` and ``running_var`` are overwritten in place.
        batches: any iterable; exactly ``num_batches`` items are taken from it (no more).
        num_batches: how many batches to use (Wu & Johnson: about 200, 1e3-1e4 samples in all).
        forward: ``forward(model, batch)`` runs the model on one item of ``batches``. Default
            (`default_forward`): a tuple or list, such as an ``(input, target)`` pair, is run as
            ``model(batch[0])``; a dict raises TypeError; anything else is run as ``model(batch)``. Batches
            must already be on the model's device (or ``forward`` moves them).
        estimator: ``"algorithm2"`` or ``"total"``, the population variance written to ``running_var``.
        progress: show a tqdm progress bar.

    Returns:
        ``{qualified layer name: LayerStatistics}`` for every layer with running statistics (the model
        itself, if it is a BN layer, is named ``""``).

    Side effects: only ``running_mean`` and ``running_var`` of the BN layers change, all at the end, after
    the whole pass succeeded. ``num_batches_tracked`` is left as it was: it counts training steps (and
    is the divisor of ``momentum=None``), and recomputing statistics is not a training step. The train/eval
    mode of every module, the parameters and the hooks are as they were on return, also when an error is
    raised. Other stateful modules (anything that changes state in forward) do run ``num_batches`` times.

    Raises:
        ValueError: ``batches`` ran out before ``num_batches`` (the message says how many it got), or a
            layer received a batch with one value per channel; the model is left untouched.
        FloatingPointError: a layer's statistics are not finite (NaN or inf in its input); nothing is written.
        Whatever ``forward`` raises, with the model left untouched.

    Under ``torch.distributed`` (initialized, world size > 1) every rank must call this with the same model
    and the same ``num_batches``; the per-layer sums are all-reduced, so every rank writes the same
    statistics, computed over the batches of all ranks (each rank's input to a layer counts as one batch; for
    a SyncBatchNorm, which normalizes over its process group, the ``"algorithm2"`` variance therefore leaves
    out the spread between ranks' means, while the mean and ``"total"`` are unaffected). If one rank runs out
    of data, every rank raises the ValueError. If one rank raises anything else, the others wait in the
    collective until the process group's timeout.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"precise_bn: num_batches must be a positive integer, got {num_batches!r}")
    _check_estimator(estimator)
    run = default_forward if forward is None else forward

    layers = _layers_with_running_statistics(model)
    if not layers:
        return {}
    accumulators = {bn: PopulationAccumulator(bn.num_features, bn.running_mean.device) for bn in layers.values()}
    modes = [(module, module.training) for module in model.modules()]
    saved_buffers = [
        (bn, name, buffer, buffer.clone())
        for bn in accumulators
        for name, buffer in bn._buffers.items()
        if buffer is not None
    ]
    handles = []
    seen = 0
    try:
        for module in model.modules():
            module.training = module in accumulators  # the attribute, not .train(): no overrides, no recursion
        for name, bn in layers.items():
            handles.append(
                bn.register_forward_pre_hook(_input_hook(accumulators[bn], _label(bn, name)), with_kwargs=True)
            )
        iterator = iter(batches)
        with torch.no_grad(), tqdm(total=num_batches, desc="precise BN", disable=not progress) as bar:
            while seen < num_batches:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                run(model, batch)
                seen += 1
                bar.update()
    finally:
        for handle in handles:
            handle.remove()
        # The pass ran the layers in training mode, which updated their running statistics and counters;
        # put the original tensors back with their original values (in case a layer replaced a buffer).
        with torch.no_grad():
            for bn, name, buffer, value in saved_buffers:
                bn._buffers[name] = buffer
                buffer.copy_(value)
        for module, training in modes:
            module.training = training

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    fewest = seen
    if distributed:
        # Agree on the count first, so that every rank raises together instead of one waiting forever.
        counts = torch.tensor([seen], dtype=torch.float64, device=next(iter(accumulators.values())).device)
        dist.all_reduce(counts, op=dist.ReduceOp.MIN)
        fewest = round(counts.item())
    if fewest < num_batches:
        where = (
            f"{seen} batches on this rank ({fewest} on the rank with the fewest)" if distributed else f"{seen} batches"
        )
        raise ValueError(
            f"precise_bn: asked for num_batches={num_batches} but the data ran out after {where}; "
            f"pass more data or a smaller num_batches. The model's statistics were left untouched."
        )
    if distributed:
        _all_reduce_accumulators(list(accumulators.values()))

    report: dict[str, LayerStatistics] = {}
    unused, nonfinite = [], []
    for name, bn in layers.items():
        acc = accumulators[bn]
        if acc.batches == 0:
            unused.append(name)
            report[name] = LayerStatistics(batches=0, values=0, mean=None, var=None)
            continue
        mean, var = acc.statistics(estimator)
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            nonfinite.append(name)
        report[name] = LayerStatistics(batches=acc.batches, values=acc.count, mean=mean, var=var)
    if nonfinite:
        raise FloatingPointError(
            f"precise_bn: non-finite population statistics (NaN or inf in the input) for layers {nonfinite}; "
            f"the model's statistics were left untouched."
        )
    if unused:
        warnings.warn(
            f"precise_bn: layers {unused} received no input in {num_batches} batches; their running statistics "
            f"were left as they were.",
            RuntimeWarning,
            stacklevel=2,
        )
    with torch.no_grad():
        for name, bn in layers.items():
            stats = report[name]
            if stats.mean is not None and stats.var is not None:
                bn.running_mean.copy_(stats.mean.to(bn.running_mean.device))
                bn.running_var.copy_(stats.var.to(bn.running_var.device))
    return report


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"precise_bn: estimator={estimator!r} is not one of {', '.join(map(repr, ESTIMATORS))}")


def _layers_with_running_statistics(model: nn.Module) -> dict[str, _BatchNorm]:
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            continue
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"precise_bn: {_label(module, name)} is a lazy layer whose size is not known yet; run one forward first"
            )
        if module.running_mean is not None and module.running_var is not None:
            layers[name] = module
    return layers


def _label(bn: nn.Module, name: str) -> str:
    return f"{type(bn).__name__}({bn.num_features}) '{name}'"


def _input_hook(accumulator: PopulationAccumulator, label: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        accumulator.update(args[0] if args else kwargs["input"], label)

    return hook
