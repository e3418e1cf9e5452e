"""The map-output format that crosses peers, and the map/reduce steps around it."""

from __future__ import annotations

import gc
import json
import types
from collections import Counter

import pytest

from ipdc.config import config_from_dict
from ipdc.errors import ConfigError
from ipdc.runner import mapreduce
from ipdc.runner.mapreduce import line_pieces, map_pairs, reduce_partitions
from ipdc.wire.partition import read_groups, read_partition, stable_partition, write_partitions


def module(**functions: object) -> types.ModuleType:
    mod = types.ModuleType("user")
    for name, fn in functions.items():
        setattr(mod, name, fn)
    return mod


def collect(module_: types.ModuleType, docs: list[bytes]) -> list[tuple[str, str]]:
    out = reduce_partitions(module_, docs).decode("utf-8", "surrogateescape")
    return [tuple(line.rsplit("\t", 1)) for line in out.splitlines()]  # type: ignore[misc]


# Keys and values of every kind a user's map may emit: the common str/int case, keys
# with the format's separators, lone surrogates (bytes that were not UTF-8, and one that
# only surrogatepass can carry), the empty key, and values and keys that are not str/int.
PAIRS: list[tuple[object, object]] = [
    ("word", 3), ("word", 4), ("", 1), ("tab\there", 2), ("new\nline", 5), ("new\nline", 1),
    ("bad\udcff\udcfe", 7), ("lone\ud800", 1), ("é日本🚀", -2), ("big", 10**30),
    ("flag", True), ("ratio", 0.5), ("list", [1, "x"]), (42, 1), (("t", 1), 2), (["t", 1], 3),
]


def test_every_pair_survives_the_format_and_lands_in_its_partition() -> None:
    docs = write_partitions(PAIRS, 3)
    got: list[tuple[object, object]] = []
    for p, doc in enumerate(docs):
        keys, values, other = read_partition(doc)  # the KV1-shaped adapter over read_groups
        for key, value in [*zip(keys, values, strict=True), *other]:
            assert stable_partition(key, 3) == p
            got.append((key, value))
    expected = [(tuple(k) if isinstance(k, list) else k, v) for k, v in PAIRS]  # array keys: tuples
    assert sorted(map(repr, got)) == sorted(map(repr, expected))
    flag = [v for k, v in got if k == "flag"]
    assert flag == [True] and type(flag[0]) is bool  # not folded into an int


def test_reduce_merges_values_of_a_key_across_documents_and_repeats() -> None:
    mapper_a = write_partitions([("a", 1), ("b", 2), ("a", 3), (["k"], 1)], 1)
    mapper_b = write_partitions([("b", 5), ("c", 1), (["k"], 2)], 1)
    seen: dict[str, list[object]] = {}

    def reduce(key: object, values: list[object]) -> object:
        seen[json.dumps(key)] = sorted(values)  # type: ignore[type-var]
        return sum(values)  # type: ignore[arg-type]

    # keys of mixed types sort by type name, then canonical JSON: the strings before the tuple
    assert reduce_partitions(module(reduce=reduce), mapper_a + mapper_b) == b'a\t4\nb\t7\nc\t1\n["k"]\t3\n'
    stream = (doc for doc in mapper_b + mapper_a)  # documents may come one at a time, in any order
    assert reduce_partitions(module(reduce=reduce), stream) == b'a\t4\nb\t7\nc\t1\n["k"]\t3\n'
    assert seen == {'"a"': [1, 3], '"b"': [2, 5], '"c"': [1], '["k"]': [1, 2]}


def test_output_is_sorted_and_gives_back_the_input_bytes() -> None:
    raw = b"z y \xff\xfe x \xc3\xa9 y\n"
    text = raw.decode("utf-8", "surrogateescape")
    mod = module(map_chunk=lambda t: Counter(t.split()).items(), reduce=lambda k, vs: sum(vs))
    docs = write_partitions(map_pairs(mod, text), 1)
    lines = reduce_partitions(mod, docs).splitlines()
    assert lines == sorted(lines, key=lambda b: b.decode("utf-8", "surrogateescape"))
    assert Counter({k: int(v) for k, v in (line.split(b"\t") for line in lines)}) == Counter(raw.split())


def test_empty_input_makes_empty_partitions_and_an_empty_part() -> None:
    docs = write_partitions([], 4)
    assert docs == [b""] * 4  # the empty CID: nothing to add to kubo
    assert all(read_groups(d) == ([], [], True) for d in docs)
    assert reduce_partitions(module(reduce=lambda k, vs: sum(vs)), docs) == b""


def test_map_chunk_items_are_used_as_they_are_and_other_pairs_are_combined() -> None:
    counted = Counter(["a", "b", "a"]).items()
    assert map_pairs(module(map_chunk=lambda t: counted), "ignored") is counted
    raw = module(map_chunk=lambda t: ((w, 1) for w in t.split()), combine=lambda k, vs: sum(vs))
    assert sorted(map_pairs(raw, "a b a a")) == [("a", 3), ("b", 1)]
    uncombined = module(map=lambda line: ((w, 1) for w in line.split()))
    assert sorted(map_pairs(uncombined, "a b\na")) == [("a", 1), ("a", 1), ("b", 1)]


def test_a_big_chunk_reaches_map_chunk_in_pieces_of_whole_lines_with_the_same_result(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapreduce, "BULK_PIECE", 4096)
    lines = [f"w{i % 977} w{i % 13} \xe9{i % 5}" for i in range(3 * 4096 // 12)]
    text = "\n".join(lines) + "\n"
    pieces: list[str] = []

    def bulk(piece: str) -> object:
        pieces.append(piece)
        return Counter(piece.split()).items()

    combined = map_pairs(module(map_chunk=bulk, combine=lambda k, vs: sum(vs)), text)
    assert len(pieces) > 2 and "".join(pieces) == text and all(p.endswith("\n") for p in pieces)
    assert all(len(p) <= 4096 + max(map(len, lines)) + 1 for p in pieces)
    pairs = list(combined)
    assert len(pairs) == len({k for k, _ in pairs}) and dict(pairs) == Counter(text.split())
    totals: Counter[str] = Counter()
    for key, count in map_pairs(module(map_chunk=lambda t: Counter(t.split()).items()), text):
        totals[key] += count
    assert totals == Counter(text.split())


@pytest.mark.parametrize("text", ["", "a", "a\n", "\n\n\n", "ab\ncd\nef", "abc\n" * 10])
@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_line_pieces_cover_the_text_and_end_at_newlines(text: str, size: int) -> None:
    pieces = list(line_pieces(text, size))
    assert "".join(pieces) == text and all(pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])


@pytest.mark.parametrize(("sandbox", "error"), [
    ({"max_pids": 0}, "sandbox.max_pids: must be positive"),
    ({"fetch_stall": -1.0}, "sandbox.fetch_stall: must be positive"),
    ({"task_timeout": 0}, "sandbox.task_timeout: must be positive"),
    ({"nice": 20}, "sandbox.nice: must be 0 to 19"),
    ({"max_pids": "64"}, "sandbox.max_pids"),
])
def test_sandbox_settings_are_checked(sandbox: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        config_from_dict({"sandbox": sandbox})
    assert config_from_dict({"sandbox": {"max_pids": 8, "fetch_stall": 2.5}}).sandbox.max_pids == 8


def test_reduce_leaves_the_garbage_collector_as_it_found_it() -> None:
    docs = write_partitions([("a", 1)], 1)
    assert gc.isenabled()
    reduce_partitions(module(reduce=lambda k, vs: sum(vs)), docs)
    assert gc.isenabled()
    gc.disable()
    try:
        reduce_partitions(module(reduce=lambda k, vs: sum(vs)), docs)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ValueError):
        reduce_partitions(module(reduce=lambda k, vs: sum(vs)), [b"not a partition"])
    assert gc.isenabled()
