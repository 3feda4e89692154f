"""bnlab: Batch Normalization done right, fast, and reproduced.

- ``bnlab.reference``: the paper's algorithms in NumPy (the specification).
- ``bnlab.functional.batch_norm``: stateless, validated, dispatches to a backend.
- ``bnlab.nn``: drop-in ``BatchNorm1d/2d/3d`` and ``convert`` to swap them into any model.
- ``set_backend`` / ``use_backend`` / ``get_backend``: pick ``reference``, ``native`` or ``auto``.
"""

from bnlab import functional, nn, reference
from bnlab.backends import available_backends, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "functional",
    "get_backend",
    "nn",
    "reference",
    "set_backend",
    "use_backend",
]
