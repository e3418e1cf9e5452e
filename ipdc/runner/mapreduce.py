"""Map, combine and reduce around the user's functions: the pure part of a runner."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, ItemsView, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from ipdc.wire.partition import read_partition

#: Values of one key are combined whenever this many have piled up (see ``combine``).
COMBINE_EVERY = 256


def _group_key(key: Any) -> Any:
    """A dict key for ``key``: itself when hashable, else its canonical JSON."""
    if isinstance(key, (list, dict)):
        return ("\0json", json.dumps(key, sort_keys=True))
    return key


def split_lines(text: str) -> list[str]:
    """Lines without their ``\\n``; a final newline does not make an extra empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def map_pairs(module: ModuleType, text: str) -> Iterable[tuple[Any, Any]]:
    """The (key, value) pairs of one chunk, after the user's map and combine.

    A ``map_chunk`` that returns a dict's items (WordCount's ``Counter(...).items()``)
    already holds each key once with its values combined, so its pairs are used as
    they are: a regroup would only copy them. Anything else is grouped by key and
    combined (``combine`` may run zero or more times, so either is correct).
    """
    bulk = getattr(module, "map_chunk", None)
    pairs: Iterable[tuple[Any, Any]]
    if bulk is not None:
        pairs = bulk(text)
        if isinstance(pairs, ItemsView):
            return pairs
    else:
        mapper = module.map
        pairs = (pair for line in split_lines(text) for pair in mapper(line))
    return _grouped(pairs, getattr(module, "combine", None))


def _grouped(pairs: Iterable[tuple[Any, Any]],
             combine: Callable[[Any, list[Any]], Any] | None) -> list[tuple[Any, Any]]:
    """Group pairs by key and combine each key's values (when ``combine`` exists)."""
    groups: dict[Any, tuple[Any, list[Any]]] = {}
    for key, value in pairs:
        try:
            entry = groups.get(key)
        except TypeError:
            entry = groups.get(gk := _group_key(key))
        else:
            gk = key
        if entry is None:
            groups[gk] = (key, [value])
            continue
        values = entry[1]
        values.append(value)
        if combine is not None and len(values) >= COMBINE_EVERY:
            groups[gk] = (key, [combine(key, values)])
    out: list[tuple[Any, Any]] = []
    for key, values in groups.values():
        if combine is not None and len(values) > 1:
            values = [combine(key, values)]
        out.extend((key, value) for value in values)
    return out


def reduce_partitions(module: ModuleType, documents: Iterable[bytes]) -> bytes:
    """Merge one partition's map outputs, reduce each key, and format the sorted part."""
    merged: dict[Any, list[Any]] = {}
    originals: dict[Any, Any] = {}  # group key -> key, for keys that are not hashable
    for document in documents:
        keys, values, other = read_partition(document)
        if not merged:
            merged = {key: [value] for key, value in zip(keys, values)}
            if len(merged) != len(keys):  # a key repeats: merge them one by one
                merged = {}
                _merge(merged, keys, values)
        else:
            _merge(merged, keys, values)
        for key, value in other:
            gk = _group_key(key)
            if gk is not key:
                originals[gk] = key
            found = merged.get(gk)
            if found is None:
                merged[gk] = [value]
            else:
                found.append(value)
    reduce = module.reduce
    order = _sorted_keys(merged, originals)
    lines = []
    for gk in order:
        key = originals.get(gk, gk) if originals else gk
        value = reduce(key, merged[gk])
        if type(key) is str and type(value) is int:
            lines.append(f"{key}\t{value}\n")
        else:
            lines.append(f"{format_field(key)}\t{format_field(value)}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _merge(merged: dict[Any, list[Any]], keys: list[str], values: list[int]) -> None:
    get = merged.get
    for key, value in zip(keys, values):
        found = get(key)
        if found is None:
            merged[key] = [value]
        else:
            found.append(value)


def _sorted_keys(merged: dict[Any, list[Any]], originals: dict[Any, Any]) -> list[Any]:
    """Group keys in the order of their keys; keys of mixed types by type, then canonical JSON."""
    if not originals:
        try:
            return sorted(merged)
        except TypeError:
            pass
    real = originals.get
    try:
        return sorted(merged, key=lambda gk: real(gk, gk))
    except TypeError:
        return sorted(merged, key=lambda gk: (type(real(gk, gk)).__name__,
                                              json.dumps(real(gk, gk), sort_keys=True)))


def format_field(value: Any) -> str:
    """Strings as they are (like Hadoop's TextOutputFormat), anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def load_module(path: Path, name: str) -> ModuleType:
    """Import a user file under a fresh module name: nothing is shared with other jobs."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


