"""Strict typed loading: a dataclass built from a mapping, unknown keys and wrong types refused.

`from_dict(cls, data, "train")` names the dotted params key in every error, so a typo in
params.yaml fails before any work. `check_values` turns value rules (ranges, choices) into
the same one-line ConfigError. pipeline/config/ holds the dataclasses; this, the machinery.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pipeline.errors import ConfigError


def check_values(section: str, rules: list[tuple[str, object, bool, str]]) -> None:
    """Raise one ConfigError line for the first rule that fails: (key, value, ok, what is allowed)."""
    for key, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"params key '{section}.{key}' is {value!r}; allowed: {allowed}")


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> tuple[str, object, bool, str]:
    return (key, value, value in choices, " | ".join(choices))


def _fraction(key: str, value: float) -> tuple[str, object, bool, str]:
    return (key, value, 0.0 <= value <= 1.0, "a number in [0, 1]")


def _at_least(key: str, value: float, low: float) -> tuple[str, object, bool, str]:
    return (key, value, value >= low, f"{low:g} or more")


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"params key '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(hint, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"params key '{key}' must be a mapping, got {type(value).__name__}")
        _, value_hint = typing.get_args(hint)
        return {str(k): _check_type(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"params key '{key}' must be a list, got {type(value).__name__}")
        (item_hint,) = typing.get_args(hint)
        return [_check_type(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _check_type(value, arg, key)
                except ConfigError:
                    continue
        raise ConfigError(f"params key '{key}' has value {value!r}, expected {hint}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(
            f"params key '{key}' must be {hint.__name__}, got {type(value).__name__} ({value!r})"
        )
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown params key(s) {', '.join(repr(f'{prefix}.{k}'.lstrip('.')) for k in unknown)} "
            f"in {where}; known keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}".lstrip(".")
        if f.name in data:
            kwargs[f.name] = _check_type(data[f.name], hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"params key '{key}' is required")
    return cls(**kwargs)


def as_dict(obj: Any) -> Any:
    """Plain-JSON form of a config dataclass (for fingerprints and reports)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
