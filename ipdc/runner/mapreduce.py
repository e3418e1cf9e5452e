"""Map, combine and reduce around the user's functions: the pure part of a runner."""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
from collections.abc import Callable, ItemsView, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from ipdc.wire.partition import KeyGroups, read_groups


def split_lines(text: str) -> list[str]:
    """Lines without their ``\\n``; a final newline does not make an extra empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def takes_path(function: Callable[..., Any]) -> bool:
    """Whether a user's ``map``/``map_chunk`` takes a second argument, the input file's
    path (Hadoop's ``map.input.file``): two positional parameters, or ``*args``."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin or callable object without a signature
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def map_pairs(module: ModuleType, text: str, path: str = "") -> Iterable[tuple[Any, Any]]:
    """The (key, value) pairs of one chunk, after the user's map and combine.

    ``path``: the input file the chunk is part of, given to a ``map(line, path)`` (or
    ``map_chunk(text, path)``); whether the function takes it is checked once per chunk.

    A ``map_chunk`` that returns a dict's items (WordCount's ``Counter(...).items()``)
    already holds each key once with its values combined, so its pairs are used as
    they are: a regroup would only copy them. Anything else is grouped by key and, when
    the job has ``combine``, combined (``combine`` may run zero or more times, so either
    is correct). The result is a :class:`KeyGroups` then, which
    :func:`~ipdc.wire.partition.write_partitions` splits without grouping again.
    """
    bulk = getattr(module, "map_chunk", None)
    pairs: Iterable[tuple[Any, Any]]
    if bulk is not None:
        call = (lambda piece: bulk(piece, path)) if takes_path(bulk) else bulk
        if len(text) <= BULK_PIECE:
            pairs = call(text)
            if isinstance(pairs, ItemsView):
                return pairs
        else:
            pairs = (pair for piece in line_pieces(text, BULK_PIECE) for pair in call(piece))
    else:
        mapper = module.map
        if takes_path(mapper):
            pairs = (pair for line in split_lines(text) for pair in mapper(line, path))
        else:
            pairs = (pair for line in split_lines(text) for pair in mapper(line))
    combine = getattr(module, "combine", None)
    groups = KeyGroups()
    groups.add_pairs(pairs, combine)
    if combine is not None:
        groups.combine_all(combine)
    return groups


#: Characters of a chunk handed to ``map_chunk`` at once. A bulk map typically builds a
#: list of every token of its text (``text.split()``): some 60 bytes per token, so a whole
#: 25 MB chunk at once peaked at 400 MB per runner, where 4 M characters take 60 MB. As
#: ``map_chunk(text)`` means ``map`` over each line of ``text``, it may be called per piece
#: of whole lines; the pieces' pairs are then grouped (and combined) like ``map``'s.
BULK_PIECE = 4 << 20


def line_pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, each ending at a newline (the
    last one at the end of ``text``)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def reduce_partitions(module: ModuleType, documents: Iterable[bytes]) -> bytes:
    """Merge one partition's map outputs, reduce each key, and format the sorted part.

    Documents are read one at a time, so ``documents`` may be a stream: only the
    merged groups are held, never every document at once.
    """
    groups = merge_partitions(documents)
    reduce = module.reduce
    lines = []
    for key, values in groups.sorted_items():
        value = reduce(key, values)
        if type(key) is str and type(value) is int:
            lines.append(f"{key}\t{value}\n")
        else:
            lines.append(f"{format_field(key)}\t{format_field(value)}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def merge_partitions(documents: Iterable[bytes]) -> KeyGroups:
    """One partition's map outputs merged by key, read one document at a time."""
    groups = KeyGroups()
    with _collector_paused():
        for document in documents:
            groups.add_columns(read_groups(document))
    return groups


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while map outputs are decoded and merged.

    Decoding makes a container per value (a dict, a list), all kept, and every 700 of
    them the collector would walk the young ones, and now and then everything: a fifth
    of the merge's time when values are dicts. The merge runs no user code and makes no
    reference cycles, so the collector could find nothing to free there.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
