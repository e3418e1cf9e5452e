"""The generic MapReduce path outside IPDC: a job's own ``map``/``combine``/``reduce``
run line by line in plain Python, the yardstick for ``ipdc mr`` on the same files.

``run_local`` is what a user would write without IPDC: each newline-aligned chunk is
mapped line by line and grouped by key in a dict, ``combine`` (when the job has one)
folds each key's values of that chunk into one, the parent merges the chunks' groups,
and ``reduce`` runs per key. That is IPDC's contract too (``combine`` may run any number
of times on any subset of a key's values), so every variant has the same result. It
shares no code with IPDC's runner on purpose: it is the reference, not a copy.

Imported by path from the scripts (``bench/`` is not a package).
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

_modules: dict[str, ModuleType] = {}


def job_without(source: Path, target: Path, *names: str) -> Path:
    """Copy a job file without the top-level functions ``names`` (``map_chunk``, ``combine``):
    the same job on another path through IPDC, derived so that it cannot drift."""
    tree = ast.parse(source.read_text())
    tree.body = [node for node in tree.body if not (isinstance(node, ast.FunctionDef) and node.name in names)]
    target.write_text(ast.unparse(tree) + "\n")
    return target


def _load(path: str) -> ModuleType:
    """A job file imported once per process (a Pool worker maps many chunks)."""
    if path not in _modules:
        spec = importlib.util.spec_from_file_location(f"job_{len(_modules)}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


def map_range(map_file: str, path: str, offset: int, length: int) -> dict[Any, list[Any]]:
    """One newline-aligned byte range through ``map`` line by line (lines split on
    ``\\n`` only, as IPDC does), grouped by key, each key's values combined once."""
    module = _load(map_file)
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read(length).decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    mapper = module.map
    groups: dict[Any, list[Any]] = {}
    for line in lines:
        for key, value in mapper(line):
            values = groups.get(key)
            if values is None:
                groups[key] = [value]
            else:
                values.append(value)
    combine: Callable[[Any, list[Any]], Any] | None = getattr(module, "combine", None)
    if combine is not None:  # a key with one value has nothing to combine
        return {key: [combine(key, values)] if len(values) > 1 else values for key, values in groups.items()}
    return groups


def _map_args(args: tuple[str, str, int, int]) -> dict[Any, list[Any]]:
    return map_range(*args)


def reduce_all(reduce_file: str, parts: Iterable[dict[Any, list[Any]]]) -> dict[Any, Any]:
    """Merge the chunks' groups and reduce each key."""
    merged: dict[Any, list[Any]] = {}
    for part in parts:
        for key, values in part.items():
            found = merged.get(key)
            if found is None:
                merged[key] = values
            else:
                found.extend(values)
    reduce = _load(reduce_file).reduce
    return {key: reduce(key, values) for key, values in merged.items()}


def run_local(map_file: Path, reduce_file: Path, path: Path, ranges: list[tuple[int, int]],
              processes: int) -> dict[Any, Any]:
    """The whole job in this process (``processes=1``) or on ``multiprocessing.Pool(processes)``,
    whose chunks' groups are merged as they come in, while the workers map the next ones."""
    args = [(str(map_file), str(path), offset, length) for offset, length in ranges]
    if processes == 1:
        return reduce_all(str(reduce_file), map(_map_args, args))
    from multiprocessing import Pool

    with Pool(processes) as pool:
        return reduce_all(str(reduce_file), pool.imap(_map_args, args))
