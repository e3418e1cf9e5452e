"""Pure pieces of MapReduce: chunk planning, partitioning, map/combine/reduce."""

from __future__ import annotations

import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

from ipdc.runner.mapreduce import (
    format_field,
    map_pairs,
    reduce_partitions,
    split_lines,
)
from ipdc.submit.inputs import plan_chunks
from ipdc.submit.mapreduce import default_chunks
from ipdc.wire.partition import (
    COMBINE_EVERY,
    read_groups,
    read_partition,
    stable_partition,
    write_partitions,
)


def test_chunks_are_line_aligned_and_cover_the_file(tmp_path: Path) -> None:
    data = b"".join(f"line {i} {'x' * (i % 17)}\n".encode() for i in range(1000)) + b"no newline at end"
    path = tmp_path / "f"
    path.write_bytes(data)
    for n in (1, 2, 7, 64):
        ranges = plan_chunks(path, n)
        assert b"".join(data[o:o + n_] for o, n_ in ranges) == data
        assert all(data[o + n_ - 1:o + n_] == b"\n" for o, n_ in ranges[:-1])
        assert len(ranges) <= n


def test_a_line_longer_than_a_chunk_makes_fewer_chunks(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10_000 + b"\nshort\n")
    assert plan_chunks(path, 4) == [(0, 10_001), (10_001, 6)]
    path.write_bytes(b"")
    assert plan_chunks(path, 4) == [(0, 0)]


def test_default_chunks() -> None:
    assert default_chunks(0, 4) == 1
    assert default_chunks(202 << 20, 2) == 8
    assert default_chunks(3 << 20, 2) == 3
    assert default_chunks(10 << 30, 4) == 160


def test_stable_partition_does_not_depend_on_hash_seed() -> None:
    keys = ["the", "café", "日本", "\udcff", 42, ["a", 1]]
    code = ("from ipdc.wire.partition import stable_partition;"
            f"print([stable_partition(k, 7) for k in {keys!r}])")
    outs = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "PATH": ""},
                           capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1
    assert outs.pop().strip() == str([stable_partition(k, 7) for k in keys])


def wordcount(with_combine: bool) -> types.ModuleType:
    module = types.ModuleType("wc")
    module.map = lambda line: ((w, 1) for w in line.split())  # type: ignore[attr-defined]
    if with_combine:
        module.combine = lambda k, vs: sum(vs)  # type: ignore[attr-defined]
    module.reduce = lambda k, vs: sum(vs)  # type: ignore[attr-defined]
    return module


def test_map_partition_reduce_round_trip_with_surrogates() -> None:
    raw = b"a b a\r\n\xff\xfe a \xc3\xa9t\xc3\xa9\n\n" + b"z " * 600
    text = raw.decode("utf-8", "surrogateescape")
    for combine in (True, False):
        module = wordcount(combine)
        pairs = list(map_pairs(module, text))
        docs = write_partitions(pairs, 3)
        parts = [reduce_partitions(module, [d]) for d in docs]
        counts = Counter()
        for p, part in enumerate(parts):
            for line in part.splitlines():
                key, _, value = line.rpartition(b"\t")
                counts[key] = int(value)
                assert stable_partition(key.decode("utf-8", "surrogateescape"), 3) == p
        assert counts == Counter(raw.split())
        assert [v for k, v in pairs if k == "z"] == ([600] if combine else [1] * 600)


def test_split_lines_and_format() -> None:
    assert split_lines("a\nb\n") == ["a", "b"] and split_lines("a\n\nb") == ["a", "", "b"]
    assert format_field("x y") == "x y" and format_field(3) == "3" and format_field([1, "é"]) == '[1, "é"]'


def test_unhashable_keys_group_by_value() -> None:
    module = types.ModuleType("m")
    module.map = lambda line: [([line, 1], 1), ([line, 1], 2)]  # type: ignore[attr-defined]
    module.reduce = lambda k, vs: sorted(vs)  # type: ignore[attr-defined]
    docs = write_partitions(map_pairs(module, "k\nk\n"), 1)
    assert read_partition(docs[0])[:2] == ([], [])  # list keys travel in the JSON section
    assert reduce_partitions(module, docs) == b'["k", 1]\t[1, 1, 2, 2]\n'


def concatenating(**functions: object) -> types.ModuleType:
    """A job whose combine and reduce concatenate lists: associative but not commutative,
    so a result shows which values each call saw, and in which order."""
    module = types.ModuleType("concat")
    module.reduce = lambda k, vs: [x for v in vs for x in v]  # type: ignore[attr-defined]
    for name, fn in functions.items():
        setattr(module, name, fn)
    return module


def test_combine_folds_bounded_runs_of_a_key_in_order_and_reduce_gets_the_rest() -> None:
    calls: list[int] = []

    def combine(key: object, values: list[list[int]]) -> list[int]:
        calls.append(len(values))
        return [x for v in values for x in v]

    n = 3 * COMBINE_EVERY + 5
    text = "".join(f"{i}\n" for i in range(n))
    module = concatenating(map=lambda line: [("k", [int(line)]), (line, [0])], combine=combine)
    pairs = list(map_pairs(module, text))
    assert [v for k, v in pairs if k == "k"] == [list(range(n))]  # one value left, in the map's order
    assert max(calls) <= COMBINE_EVERY and len(calls) == 4  # never more than COMBINE_EVERY at once
    assert reduce_partitions(module, write_partitions(pairs, 1)).startswith(b"0\t[0]\n")
    part = reduce_partitions(module, write_partitions(pairs, 2)[stable_partition("k", 2):][:1])
    assert f"k\t{list(range(n))}\n".encode() in part


def test_without_combine_reduce_gets_every_value_of_every_map_task() -> None:
    module = concatenating(map=lambda line: [(("k", 1), [int(line)])])
    docs = [*write_partitions(map_pairs(module, "1\n2\n"), 1), *write_partitions(map_pairs(module, "3\n"), 1)]
    assert reduce_partitions(module, docs) == b'["k", 1]\t[1, 2, 3]\n'
    assert read_groups(docs[0]).values == [[[1], [2]]]  # grouped: one entry, the key's list of values


def test_keys_of_mixed_types_sort_the_same_whatever_the_order_of_the_documents() -> None:
    keys: list[object] = ["b", "a", 3, 1.5, None, ("t", 2), ["t", 1], ("t", "x"), {"d": 1}, [{"d": 0}]]
    module = types.ModuleType("m")
    module.reduce = lambda k, vs: len(vs)  # type: ignore[attr-defined]
    docs = [write_partitions([(key, 1)], 1)[0] for key in keys]
    parts = {reduce_partitions(module, docs[::step]) for step in (1, -1)}
    assert len(parts) == 1
    assert parts.pop().decode().splitlines() == [
        # by type name (NoneType, dict, float, int, str, tuple), then by canonical JSON
        "null\t1", '{"d": 1}\t1', "1.5\t1", "3\t1", "a\t1", "b\t1",
        '["t", "x"]\t1', '["t", 1]\t1', '["t", 2]\t1', '[{"d": 0}]\t1']


def test_comparable_keys_sort_by_value() -> None:
    module = types.ModuleType("m")
    module.reduce = lambda k, vs: sum(vs)  # type: ignore[attr-defined]
    docs = write_partitions([((2000, "b"), 1), ((1999, "z"), 2), ((2000, "a"), 3), ((2000, "a"), 4)], 1)
    assert reduce_partitions(module, docs) == b'[1999, "z"]\t2\n[2000, "a"]\t7\n[2000, "b"]\t1\n'


def test_list_and_tuple_keys_are_one_key_and_reach_combine_as_tuples() -> None:
    seen: list[object] = []

    def combine(key: object, values: list[int]) -> int:
        seen.append(key)
        return sum(values)

    module = types.ModuleType("m")
    module.map = lambda line: [(["t", [1]], 1), (("t", (1,)), 2), (["t", [1]], 3)]  # type: ignore[attr-defined]
    module.combine = combine  # type: ignore[attr-defined]
    assert list(map_pairs(module, "x\n")) == [(("t", (1,)), 6)] and seen == [("t", (1,))]
