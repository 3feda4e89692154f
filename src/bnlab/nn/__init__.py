"""Modules: drop-in replacements for ``torch.nn.BatchNorm*d`` and the converter between the two."""

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.convert import convert, name_layers

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "name_layers"]
