"""The registry of experiments: `bnlab list` shows them, `bnlab run NAME` runs one."""

from __future__ import annotations

from bnlab.experiments.base import Experiment, UnitContext, Verdict

__all__ = ["Experiment", "UnitContext", "Verdict", "get", "names", "register"]

_REGISTRY: dict[str, type[Experiment]] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: make an experiment available by its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"experiment name {cls.name!r} is registered twice")
    missing = {"smoke", "quick", "full"} - set(cls.profiles)
    if missing:
        raise ValueError(f"experiment {cls.name!r} lacks profiles {sorted(missing)}")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Experiment:
    _load_all()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown experiment {name!r}{hint}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def _load_all() -> None:
    # Importing an experiment module registers it; kept lazy so that `import bnlab` stays light.
    from bnlab.experiments import ioffe2015_fig1, precise_bn, smallbatch  # noqa: F401
