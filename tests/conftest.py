import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, the Triton kernels run in Triton's CPU interpreter; Triton reads this when a kernel module
# is first imported, so it is set before anything imports bnlab.kernels.batchnorm.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bnlab.backends
from bnlab import kernels

# CI runs a bounded number of property examples; BNLAB_HYPOTHESIS=thorough runs many more.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("BNLAB_HYPOTHESIS", "ci"))


def pytest_collection_modifyitems(config, items):
    """The heavy checks (minutes of ahead-of-time compiling in a subprocess) go first: under pytest-xdist
    (`make test`) one process starts on them at once while the others share the rest, instead of the run
    waiting for them at the end. A stable sort: every xdist process must collect the same order."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(autouse=True)
def _isolate_backend_choice(monkeypatch):
    """Each test starts with no backend chosen in code and no BNLAB_BACKEND in the environment."""
    monkeypatch.delenv("BNLAB_BACKEND", raising=False)
    monkeypatch.setattr(bnlab.backends, "_selected", None)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_late_reports(monkeypatch):
    """Each test its own late reports of policy "skip" (pending warnings, the verdict rings and their
    one-time checks): none leak from one test into another's counts or warnings."""
    import bnlab.functional
    from bnlab.late_reports import LateReports

    monkeypatch.setattr(bnlab.functional, "_LATE_REPORTS", LateReports(bnlab.functional._report_nonfinite))


# Every backend runs the shared parity tests, which use CPU tensors: "triton" too where Triton is installed
# and runs them in its interpreter (no GPU). On a GPU machine, tests/test_triton.py runs the kernels there.
BACKENDS = ("reference", "native", *(("triton",) if kernels.triton_installed() and kernels.interpreting() else ()))
# Backends that take float64 inputs (the Triton kernels take float32/16 and bfloat16 and say so).
FLOAT64_BACKENDS = tuple(b for b in BACKENDS if b != "triton")


def write_synthetic_mnist(folder, train=600, test=200, seed=0):
    """Tiny learnable IDX files with the official names: class k lights up a 6x6 block at position k."""
    import numpy as np

    from bnlab.datasets.idx import write_idx

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            row, col = divmod(int(k), 4)
            images[i, 2 + 8 * row : 8 + 8 * row, 2 + 6 * col : 8 + 6 * col] += 150
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    return write_synthetic_mnist(tmp_path_factory.mktemp("synthetic-mnist"))
