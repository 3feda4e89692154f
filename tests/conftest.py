import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import bnlab.backends

# CI runs a bounded number of property examples; BNLAB_HYPOTHESIS=thorough runs many more.
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("BNLAB_HYPOTHESIS", "ci"))


@pytest.fixture(autouse=True)
def _isolate_backend_choice(monkeypatch):
    """Each test starts with no backend chosen in code and no BNLAB_BACKEND in the environment."""
    monkeypatch.delenv("BNLAB_BACKEND", raising=False)
    monkeypatch.setattr(bnlab.backends, "_selected", None)
    torch.manual_seed(0)
    yield


BACKENDS = ("reference", "native")
