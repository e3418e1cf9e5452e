"""Typed dataclasses from untrusted dicts (YAML config, JSON messages).

One validator serves both ipdc.conf and the MQTT channels, so both reject unknown
keys and wrong types the same way, naming the dotted path of the bad key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from ipdc.errors import IPDCError

T = TypeVar("T")


def _check(value: Any, hint: Any, where: str, error: type[IPDCError]) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(value, inner, where, error)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise error(f"{where}: expected a list, got {type(value).__name__}")
        return [_check(v, item, f"{where}[{i}]", error) for i, v in enumerate(value)]
    if origin is dict:
        key_hint, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {type(value).__name__}")
        return {
            _check(k, key_hint, f"{where} key", error): _check(v, item, f"{where}.{k}", error)
            for k, v in value.items()
        }
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, where, error)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and issubclass(hint, str) and hint is not str:
        try:  # a validating str subtype such as Cid
            return hint(value)
        except IPDCError as exc:
            raise error(f"{where}: {exc}") from None
    if (hint in (int, float) and isinstance(value, bool)) or not isinstance(value, hint):
        raise error(f"{where}: expected {hint.__name__}, got {type(value).__name__} {str(value)[:60]!r}")
    return value


Shape = tuple[dict[str, Any], dict[str, "dataclasses.Field[Any]"]]
_SHAPES: dict[type, Shape] = {}


def _shape(cls: type) -> Shape:
    """A dataclass's resolved type hints and its fields, worked out once per class: resolving
    the hints was half of what an agent spent decoding a message."""
    shape = _SHAPES.get(cls)
    if shape is None:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        shape = _SHAPES[cls] = (typing.get_type_hints(cls), fields)
    return shape


def build(cls: type[T], data: Any, where: str = "", error: type[IPDCError] = IPDCError) -> T:
    """``cls(**data)`` after checking every key and value against ``cls``'s hints."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints, fields = _shape(cls)
    for key in data:
        if key not in fields:
            dotted = f"{where}.{key}" if where else str(key)
            raise error(f"unknown key {dotted!r}; known keys here: {', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        dotted = f"{where}.{name}" if where else name
        if name in data:
            values[name] = _check(data[name], hints[name], dotted, error)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"missing key {dotted!r}")
    return cls(**values)


def in_range(where: str, value: float, low: float, high: float, error: type[IPDCError]) -> None:
    """A field's value must lie in [low, high]: untrusted numbers are bounded before use."""
    if not low <= value <= high:
        raise error(f"{where}: {value!r} is out of range ({low:g} to {high:g})")
