"""Modules: drop-in replacements for ``torch.nn.BatchNorm*d`` and the converter between the two."""

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.convert import convert, name_layers
from bnlab.nn.frozen import (
    FrozenAffineBatchNorm1d,
    FrozenAffineBatchNorm2d,
    FrozenAffineBatchNorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
from bnlab.nn.sync import SyncBatchNorm, from_sync, to_sync
from bnlab.nn.variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenAffineBatchNorm1d",
    "FrozenAffineBatchNorm2d",
    "FrozenAffineBatchNorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "SyncBatchNorm",
    "convert",
    "from_sync",
    "name_layers",
    "to_sync",
]
