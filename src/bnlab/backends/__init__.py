"""Backends: interchangeable implementations of one batch-norm contract, and the switch that picks one.

Every backend provides ``batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
eps) -> output`` with exactly the meaning of ``torch.nn.functional.batch_norm``: in training it
normalizes with the batch statistics and, when running buffers are given, updates them in place
(``running = (1 - momentum) * running + momentum * batch``, unbiased variance for the running estimate).
Input checks, policies (tiny batches, non-finite statistics) and the cumulative-average momentum live in
``bnlab.functional``, once, so a backend is only the arithmetic. What a backend does beyond the contract,
it says with attributes of its function, read through `fuses_epilogue`, `guards_update`,
`batch_statistics` and `ghosts_in_place` (the triton backend has all four).

Choosing one, most specific first: the ``backend=`` argument of ``bnlab.functional.batch_norm``,
``bnlab.use_backend(name)`` (a context manager), ``bnlab.set_backend(name)``, the ``BNLAB_BACKEND``
environment variable, and finally ``"auto"``, which picks the fastest backend that is correct for the
input. The selection is process-wide (not per thread), like ``torch.set_default_dtype``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from bnlab.backends import native, reference, triton_backend

__all__ = [
    "AUTO",
    "available_backends",
    "batch_statistics",
    "fuses_epilogue",
    "get_backend",
    "ghosts_in_place",
    "guards_update",
    "resolve",
    "set_backend",
    "use_backend",
]

BatchNormFn = Callable[..., torch.Tensor]

AUTO = "auto"
ENV_VAR = "BNLAB_BACKEND"

_BACKENDS: dict[str, BatchNormFn] = {
    "reference": reference.batch_norm,
    "native": native.batch_norm,
    "triton": triton_backend.batch_norm,
}

# None means "not chosen in code": fall back to the environment variable, then to auto.
_selected: str | None = None


def available_backends() -> tuple[str, ...]:
    """Names accepted by `set_backend`, `use_backend` and the `backend=` arguments."""
    return (AUTO, *_BACKENDS)


def _validate(name: str, origin: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{origin}: backend name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key == AUTO or key in _BACKENDS:
        return key
    raise ValueError(f"{origin}: unknown backend {name!r}; choose one of {', '.join(available_backends())}")


def set_backend(name: str) -> None:
    """Select the backend for every later call (process-wide). ``"auto"`` restores the default choice."""
    global _selected
    _selected = _validate(name, "bnlab.set_backend")


def get_backend() -> str:
    """The backend name now in force: set in code, else from ``BNLAB_BACKEND``, else ``"auto"``.

    The environment variable is read on every call that is not overridden in code (it costs about a
    microsecond, and a test or notebook that changes it sees the change at once).
    """
    if _selected is not None:
        return _selected
    env = os.environ.get(ENV_VAR)
    if env:
        return _validate(env, f"environment variable {ENV_VAR}")
    return AUTO


@contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Use a backend inside a ``with`` block and restore the previous choice on exit (even on error)."""
    global _selected
    chosen = _validate(name, "bnlab.use_backend")
    previous = _selected
    _selected = chosen
    try:
        yield chosen
    finally:
        _selected = previous


def _auto(input: torch.Tensor) -> BatchNormFn:
    # torch's own kernels: correct everywhere and the measured choice until the Triton kernels have been
    # benchmarked on a GPU against them (`bnlab bench --gpu`, README); only then may auto pick "triton".
    return _BACKENDS["native"]


def fuses_epilogue(fn: BatchNormFn) -> bool:
    """Whether a backend computes ``relu(bn(x) + residual)`` itself (``residual=``/``activation=`` keywords)."""
    return getattr(fn, "fuses_epilogue", False)


def guards_update(fn: BatchNormFn) -> bool:
    """Whether a backend checks a training call's running-statistics update on the device itself: keyword
    ``guard=`` (an int32 tensor whose first element gets the verdict word, `bnlab.kernels`' VERDICT_* bits)
    and ``num_batches_tracked=``."""
    return getattr(fn, "guards_update", False)


def batch_statistics(fn: BatchNormFn) -> Callable[..., tuple[torch.Tensor, torch.Tensor] | None]:
    """A backend's own way to compute a training batch's (mean, invstd) per channel (float32, no gradient),
    as ``statistics(input, eps, ghosts=1)`` (ghosts: per ghost batch, see `ghosts_in_place`), which may
    return None for an input it leaves to torch ops; a function that always returns None for backends
    without one."""
    return getattr(fn, "batch_statistics", _no_statistics)


def _no_statistics(input: torch.Tensor, eps: float, ghosts: int = 1) -> None:
    return None


def ghosts_in_place(fn: BatchNormFn, input: torch.Tensor) -> bool:
    """Whether a backend normalizes the ghost batches of `input` where they are: keyword ``ghosts=k`` (the
    input's consecutive chunks of N // k samples each with its own statistics; weight, bias and running
    statistics of k * C channels), instead of bnlab.functional laying them side by side first."""
    check = getattr(fn, "ghosts_in_place", None)
    return check is not None and check(input)


def resolve(name: str | None, input: torch.Tensor) -> BatchNormFn:
    """The implementation to run for this input: `name` if given, else the one in force (see module doc)."""
    # This runs on every layer call: canonical names are a dict hit, anything else goes through validation.
    key = name if name is not None else (_selected if _selected is not None else get_backend())
    fn = _BACKENDS.get(key)
    if fn is not None:
        return fn
    if key != AUTO:
        key = _validate(key, "backend=")
    return _auto(input) if key == AUTO else _BACKENDS[key]
