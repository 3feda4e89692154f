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


# Channels-last contiguity asked of the tensor itself for the ranks torch names it for: the same answer as
# the general test through a view of the channels moved last (both skip size-1 dimensions; a test checks
# it), without making the view (~1 us a call on the dev VM; a layer step asks several times).
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def layout_of(x: torch.Tensor) -> str | None:
    """The kernel layout that addresses `x` as it is in memory, or None if it needs a copy first."""
    if x.is_contiguous():
        return ROWS if math.prod(x.shape[2:]) == 1 else PLANES
    fmt = _CHANNELS_LAST.get(x.dim())
    innermost = x.is_contiguous(memory_format=fmt) if fmt is not None else x.movedim(1, -1).is_contiguous()
    return ROWS if innermost else None


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t` laid out as `layout` (`t` itself if it is already, else a copy)."""
    if layout == PLANES or math.prod(t.shape[2:]) == 1:
        return t.contiguous()
    if layout_of(t) == ROWS:
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)
