"""Inputs and their splits (ipdc.submit.inputs) and map(line, path) in the runner: pure
logic over local files. Reading inputs by CID from real kubo nodes is in
tests/integration/test_inputs.py."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from ipdc.errors import JobError
from ipdc.runner.mapreduce import BULK_PIECE, map_pairs, takes_path
from ipdc.submit.inputs import MAX_DEPTH, Input, line_ranges, local_input, parse_input, plan_chunks, plan_splits
from ipdc.wire.unixfs import cid_of_file

CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


def tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def bytes_of(source: Input, chunks: int) -> dict[str, list[bytes]]:
    """Each file's chunks, as map tasks would read them."""
    got: dict[str, list[bytes]] = {}
    for split in plan_splits(source, chunks):
        assert split.file.local is not None
        with open(split.file.local, "rb") as f:
            f.seek(split.offset)
            got.setdefault(split.file.path, []).append(f.read(split.length))
    return got


def test_a_directory_is_its_files_in_path_order_and_no_chunk_spans_two(tmp_path: Path) -> None:
    files = {"b.txt": b"one two\nthree\n" * 500, "a/z.txt": b"x y z\n" * 3000, "a/b/c.txt": b"",
             "a/.hidden": b"never read\n", ".git/config": b"never read\n", "last": b"no newline at end"}
    tree(tmp_path, files)
    source = local_input(tmp_path)
    assert [f.path for f in source.files] == ["a/b/c.txt", "a/z.txt", "b.txt", "last"]
    assert source.size == sum(len(d) for p, d in files.items() if "/." not in f"/{p}")
    for chunks in (1, 3, 8, 40):
        got = bytes_of(source, chunks)
        assert set(got) == {f.path for f in source.files}  # an empty file still makes a task
        for path, pieces in got.items():
            assert b"".join(pieces) == files[path]
            assert all(p.endswith(b"\n") for p in pieces[:-1])
    assert plan_splits(source, 8) == plan_splits(local_input(tmp_path), 8)


def test_a_job_output_directory_is_read_as_its_parts(tmp_path: Path) -> None:
    tree(tmp_path, {"part-00000": b"a\t1\n", "part-00001": b"b\t2\n", "job.json": b"{}", "_SUCCESS": b""})
    source = local_input(tmp_path)
    assert [f.path for f in source.files] == ["part-00000", "part-00001"]
    (tmp_path / "job.json").unlink()
    (tmp_path / "_SUCCESS").unlink()
    assert local_input(tmp_path).cid == source.cid  # so the parts alone and the output dir are one input


def test_a_single_file_is_one_input_named_by_its_file_and_its_cid(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_bytes(b"a b\n" * 100_000)
    source = local_input(path)
    assert source.cid == cid_of_file(path) and [f.path for f in source.files] == ["words.txt"]
    assert [(s.offset, s.length) for s in plan_splits(source, 4)] == plan_chunks(path, 4)


def test_bad_local_inputs_fail_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"does not exist .* a CID, or /ipfs/CID/path"):
        local_input(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".only-hidden").write_text("x")
    with pytest.raises(JobError, match="holds no file"):
        local_input(tmp_path / "empty")


def test_line_ranges_need_only_a_line_end_finder(tmp_path: Path) -> None:
    """The same ranges from any reader, as the remote one reads windows of a CID."""
    data = b"".join(b"w" * (i % 37) + b"\n" for i in range(5000))
    path = tmp_path / "f"
    path.write_bytes(data)

    def line_end(offset: int) -> int:
        found = data.find(b"\n", offset)
        return len(data) if found < 0 else found + 1

    for chunks in (1, 2, 7, 64):
        assert line_ranges(len(data), chunks, line_end) == plan_chunks(path, chunks)
    assert line_ranges(0, 4, line_end) == [(0, 0)]


def test_parse_input_tells_local_paths_from_ipfs_references(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_input(f"/ipfs/{CID}/docs/") == f"/ipfs/{CID}/docs"
    assert parse_input(CID) == CID
    assert parse_input("data/in.txt") == Path("data/in.txt")
    (tmp_path / CID).write_text("a local file of that name wins\n")
    assert parse_input(CID) == Path(CID)


def test_map_gets_the_path_only_when_it_takes_one() -> None:
    def one(line):  # type: ignore[no-untyped-def]
        return [(w, 1) for w in line.split()]

    def two(line, path):  # type: ignore[no-untyped-def]
        return [(w, path) for w in line.split()]

    def star(*args):  # type: ignore[no-untyped-def]
        return [(args[0], len(args))]

    assert (takes_path(one), takes_path(two), takes_path(star)) == (False, True, True)
    module = types.ModuleType("m")
    module.map = two  # type: ignore[attr-defined]
    assert sorted(map_pairs(module, "a b\nc\n", "docs/x.txt")) == [("a", "docs/x.txt"), ("b", "docs/x.txt"),
                                                                   ("c", "docs/x.txt")]
    module.map = one  # type: ignore[attr-defined]
    assert sorted(map_pairs(module, "a a\n", "docs/x.txt")) == [("a", 1), ("a", 1)]


def test_a_directory_kubo_would_shard_fails_saying_to_add_it_by_cid(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    for i in range(950):  # 950 x (250-byte name + 36-byte CID) > 256 KiB: kubo would make a HAMT
        (big / f"{i:0250d}").write_bytes(b"")
    with pytest.raises(JobError, match=r"cannot be given a CID here .*shard.*ipfs add -r"):
        local_input(big)


def test_map_chunk_gets_the_path_too_even_in_pieces() -> None:
    def map_chunk(text, path):  # type: ignore[no-untyped-def]
        return [(path, len(text.split("\n")) - 1)]

    module = types.ModuleType("m")
    module.map_chunk = map_chunk  # type: ignore[attr-defined]
    text = "word\n" * ((BULK_PIECE // 5) + 10)  # more than one piece
    pairs = list(map_pairs(module, text, "a/b.txt"))
    assert {key for key, _ in pairs} == {"a/b.txt"} and len(pairs) >= 2
    assert sum(n for _, n in pairs) == text.count("\n")


def test_a_symbolic_link_inside_a_local_input_is_refused_never_followed(tmp_path: Path) -> None:
    """Attack: a shared data directory holds links to the node's secrets (a file and a whole
    directory); following them would upload the keys into the swarm, where every member
    can read them. The walk refuses each link, naming it, before hashing anything."""
    secrets = tmp_path / "home" / "keys"
    tree(secrets, {"submitter.key": b"PRIVATE KEY\n"})
    for link, target in (("key.txt", secrets / "submitter.key"), ("keys", secrets)):
        data = tmp_path / f"data-{link}"
        tree(data, {"a.txt": b"fine\n"})
        (data / link).symlink_to(target)
        with pytest.raises(JobError, match=f"symbolic link {link} -> {target}; links inside an input are "
                                           "not followed"):
            local_input(data)
    assert local_input(secrets / "submitter.key").files[0].local == secrets / "submitter.key"  # named: read


def test_a_local_input_nested_past_the_depth_bound_is_refused_with_the_bound(tmp_path: Path) -> None:
    """Attack: a directory nested thousands deep (RecursionError in a walk that recursed
    without a bound) fails with a JobError naming the bound."""
    deep = tmp_path / "deep"
    leaf = deep.joinpath(*["d"] * (MAX_DEPTH + 5))
    leaf.mkdir(parents=True)
    (leaf / "x.txt").write_bytes(b"x\n")
    with pytest.raises(JobError, match=f"nests directories more than {MAX_DEPTH} deep"):
        local_input(deep)
    shallow = tmp_path / "ok"
    (shallow.joinpath(*["d"] * (MAX_DEPTH - 1))).mkdir(parents=True)
    (shallow.joinpath(*["d"] * (MAX_DEPTH - 1)) / "x.txt").write_bytes(b"x\n")
    assert [f.path for f in local_input(shallow).files] == ["d/" * (MAX_DEPTH - 1) + "x.txt"]
