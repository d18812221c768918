"""The table of schemes: name -> constructor, plus aliases. Adding a method is adding a row."""
from __future__ import annotations

import dataclasses
from typing import Callable

from omniq.errors import OmniqError
from omniq.schemes.base import QuantScheme

_SCHEMES: dict[str, Callable[..., QuantScheme]] = {}
_ALIASES: dict[str, str] = {}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_scheme(name: str, factory: Callable[..., QuantScheme], aliases: tuple[str, ...] = ()) -> None:
    """Register a scheme class (or a factory returning a scheme) under `name` and `aliases`."""
    _SCHEMES[_normalize(name)] = factory
    for a in aliases:
        _ALIASES[_normalize(a)] = _normalize(name)


def scheme(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator form of register_scheme; also sets the class's `name`."""
    def deco(cls):
        cls.name = name
        register_scheme(name, cls, aliases)
        return cls
    return deco


def primary_schemes() -> list[str]:
    """Registered scheme names without their aliases."""
    return sorted(_SCHEMES)


def list_schemes() -> list[str]:
    """Every registered scheme name and alias, sorted."""
    return sorted(set(_SCHEMES) | set(_ALIASES))


def get_scheme(name: str, **params) -> QuantScheme:
    """Build the scheme `name` with `params`, e.g. get_scheme("gptq", bits=4, group_size=128)."""
    if not isinstance(name, str):
        raise OmniqError(f"scheme name must be a string; got {type(name).__name__}")
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    if key not in _SCHEMES:
        raise OmniqError(f"unknown quantization scheme {name!r}; known schemes: {list_schemes()}")
    factory = _SCHEMES[key]
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        allowed = [f.name for f in dataclasses.fields(factory)]
        unknown = [p for p in params if p not in allowed]
        if unknown:
            raise OmniqError(f"{key}: unknown parameter(s) {unknown}; allowed: {allowed}")
    try:
        return factory(**params)
    except TypeError as e:  # a factory function with a fixed signature
        raise OmniqError(f"{key}: bad parameters {params}: {e}") from None
