"""Operations on whole models that use BN. Each says whether it mutates the model or returns a new one.

- `freeze_bn` / `unfreeze_bn`: keep BN frozen across .train() (mutate by default, `inplace=False` copies).
- `precise_bn`: recompute population statistics with the weights fixed (mutates the statistics only).
- `doctor`: a per-layer diagnosis with causes and fixes (never mutates).
- `fold_bn`: fold eval-mode BN into the preceding conv/linear (returns a new model).
- `fuse_bn_relu`: BN+ReLU and BN+add+ReLU as one fused call each (returns a new model).
- `conventions`: Keras/Flax momentum, names and variance conventions.
"""

from bnlab.tools.conventions import convert_momentum, load_foreign_batchnorm, variance_correction
from bnlab.tools.doctor import DoctorReport, doctor
from bnlab.tools.fold import FoldError, FoldReport, fold_bn, fold_weights
from bnlab.tools.freeze import freeze_bn, unfreeze_bn
from bnlab.tools.fuse import FuseError, fuse_bn_relu
from bnlab.tools.precise import LayerStatistics, PopulationAccumulator, precise_bn

__all__ = [
    "DoctorReport",
    "FoldError",
    "FoldReport",
    "FuseError",
    "LayerStatistics",
    "PopulationAccumulator",
    "convert_momentum",
    "doctor",
    "fold_bn",
    "fold_weights",
    "freeze_bn",
    "fuse_bn_relu",
    "load_foreign_batchnorm",
    "precise_bn",
    "unfreeze_bn",
    "variance_correction",
]
