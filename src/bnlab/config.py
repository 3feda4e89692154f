"""Typed experiment configs: defaults in a dataclass, named profiles on top, `key=value` overrides last."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["ConfigError", "config_digest", "config_to_dict", "parse_overrides", "resolve_config"]

C = TypeVar("C")


class ConfigError(ValueError):
    """A config key or value that does not fit the experiment's config class."""


def _coerce(raw: str, annotation: Any, key: str) -> Any:
    """Turn the text of a `key=value` override into the field's type, or say what was expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        return _coerce(raw, options[0], key)
    if origin is tuple:
        (item, *_rest) = typing.get_args(annotation)
        return tuple(_coerce(part.strip(), item, key) for part in raw.split(",") if part.strip())
    try:
        if annotation is bool:
            lowered = raw.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
        if annotation is str:
            return raw
    except ValueError:
        pass
    else:
        raise ConfigError(f"config key {key!r}: unsupported type {annotation!r}")
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key {key!r}: expected {name}, got {raw!r}")


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """['steps=100', 'lr=0.1'] -> {'steps': '100', 'lr': '0.1'}, refusing anything without '='."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def resolve_config(cls: type[C], profile: Mapping[str, Any], overrides: Mapping[str, str]) -> C:
    """Defaults of `cls`, then the profile's values, then the textual overrides, each key checked."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values: dict[str, Any] = dict(profile)
    for key, raw in overrides.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(names)}")
        values[key] = _coerce(raw, hints[key], key)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_digest(data: Mapping[str, Any]) -> str:
    """A short stable hash of a config dict, for naming run directories."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
