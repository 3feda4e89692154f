"""Fused Triton kernels for batch normalization (the ``triton`` backend's arithmetic).

Importing this package is cheap; Triton itself is imported on first use (`load`), so that bnlab works
where Triton is not installed and so that ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the
tests on machines without a GPU) can be set before Triton reads it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

__all__ = ["interpreting", "load", "triton_installed", "unavailable_reason"]

# The guard kernel's verdict, one int32 word (`device._guard_kernel`), as the host reads it: nonzero once
# written (ARRIVED), KEPT if the update was kept, WERE_FINITE if the old running statistics were finite.
VERDICT_ARRIVED, VERDICT_KEPT, VERDICT_WERE_FINITE = 1, 2, 4


# Asked on every layer call, also while torch.compile traces one: looked up once, here (a package search
# costs microseconds, and Dynamo warns about functools.cache).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``) instead of on a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def unavailable_reason(device_type: str) -> str | None:
    """None if the kernels can run on tensors of this device type, else a sentence saying why not."""
    if not triton_installed():
        return "Triton is not installed (pip install triton, or pip install 'bnlab[triton]')"
    if device_type == "cuda":
        return None
    if interpreting():
        return None if device_type == "cpu" else f"Triton's interpreter runs on CPU tensors, not {device_type}"
    return (
        f"the Triton kernels run on CUDA tensors, got a {device_type} tensor (set TRITON_INTERPRET=1 before "
        f"the first use to run them in Triton's CPU interpreter, for testing only; it is slow)"
    )


@functools.cache
def load() -> ModuleType:
    """The kernel module (imports Triton)."""
    return importlib.import_module("bnlab.kernels.batchnorm")
