"""The two memory layouts the kernels address in place, and how a tensor gets into one.

Pure torch (no Triton import): the ``triton`` backend picks the layout before it calls the kernels, also
while torch.compile traces it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["PLANES", "ROWS", "layout_of", "to_layout"]

ROWS = "rows"  # channels innermost: (N, C) and channels-last, each value's channels one row
PLANES = "planes"  # contiguous (N, C, *spatial): each (n, c) a plane of the spatial values


def layout_of(x: torch.Tensor) -> str | None:
    """The kernel layout that addresses `x` as it is in memory, or None if it needs a copy first."""
    S = math.prod(x.shape[2:])
    if x.is_contiguous():
        return ROWS if S == 1 else PLANES
    if x.movedim(1, -1).is_contiguous():
        return ROWS
    return None


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t` laid out as `layout` (a copy only if it is not already)."""
    if layout == PLANES or math.prod(t.shape[2:]) == 1:
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)
