"""unixfs_cid against the real kubo: every CID here is also computed by
``ipfs add --only-hash`` and the two must be equal.

kubo is the one IPDC installs (``deploy.py install``). Each session uses a fresh ``IPFS_PATH`` made with
``ipfs init --profile=test``; no daemon is needed (``--only-hash`` and offline
``ipfs add``/``ipfs block get`` work on the repo directly).

"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ipdc.wire.unixfs as u
from ipdc.node.install import find_kubo

CHUNK = u.DEFAULT_CHUNK_SIZE
LINKS = u.DEFAULT_MAX_LINKS




class Kubo:
    """Runs the ipfs CLI against a private, throw-away repo."""

    def __init__(self, binary: str, repo: Path) -> None:
        self.binary = binary
        self.env = {**os.environ, "IPFS_PATH": str(repo)}
        self.run("init", "--profile=test")

    def run(self, *args: str) -> bytes:
        done = subprocess.run([self.binary, *args], env=self.env, capture_output=True, timeout=600, check=False)
        if done.returncode:
            raise AssertionError(f"ipfs {' '.join(args)}: {done.stderr.decode(errors='replace')}")
        return done.stdout

    @staticmethod
    def _add_flags(chunk: int | None, max_links: int | None) -> list[str]:
        flags = ["--cid-version=1", "--raw-leaves"]
        if chunk is not None:
            flags.append(f"--chunker=size-{chunk}")
        if max_links is not None:
            flags.append(f"--max-file-links={max_links}")
        return flags

    def cid_of_path(self, path: Path, chunk: int | None = CHUNK, max_links: int | None = None) -> str:
        out = self.run("add", "--only-hash", "-Q", *self._add_flags(chunk, max_links), str(path))
        return out.decode().strip()

    def add_tree(self, root: Path, chunk: int | None = CHUNK, max_links: int | None = None,
                 only_hash: bool = True) -> dict[str, str]:
        """``ipfs add -r`` a directory; returns {relative path: CID}, the directory
        itself under its own name. Many files per process keeps the tests fast."""
        args = ["add", "-r", *self._add_flags(chunk, max_links), str(root)]
        if only_hash:
            args.insert(1, "--only-hash")
        result: dict[str, str] = {}
        for line in self.run(*args).decode().splitlines():
            _, cid, name = line.split(" ", 2)
            result[name] = cid
        return result


@pytest.fixture(scope="session")
def kubo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubo]:
    binary = find_kubo()
    if binary is None:
        pytest.fail("kubo is not installed: run `python3 deploy.py install`")
    yield Kubo(str(binary), tmp_path_factory.mktemp("ipfs-repo"))


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --- pure tests: no kubo --------------------------------------------------------


def test_empty_is_ipdc_empty_cid() -> None:
    assert u.cid_of(b"") == u.EMPTY_CID
    assert u.UnixFSHasher().cid() == u.EMPTY_CID
    assert u.EMPTY_CID == "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


def test_known_small_cid() -> None:
    # Widely published: `echo -n hello | ipfs add --cid-version=1 --raw-leaves`.
    assert u.cid_of(b"hello") == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"


def test_single_chunk_is_sha256_of_the_whole_file() -> None:
    data = _data(CHUNK, 1)
    assert u.cid_to_bytes(u.cid_of(data)) == bytes((1, 0x55, 0x12, 32)) + hashlib.sha256(data).digest()


def test_cid_text_round_trip() -> None:
    cid = u.cid_of(_data(3 * CHUNK, 2))
    assert cid.startswith("bafybei")
    assert u.cid_to_str(u.cid_to_bytes(cid)) == cid


@pytest.mark.parametrize(
    "bad", ["QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR",
            "BAFKREIBM6JG3UX5QUMHCN2B3FLC3TYU6DMLB4XA7U5BF44YEGNRJHC4YEQ",
            "zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA", "b!!!", ""]
)
def test_unsupported_cid_forms_raise(bad: str) -> None:
    with pytest.raises(u.UnsupportedCid):
        u.verify(b"hello", bad)


def test_verify() -> None:
    data = _data(2 * CHUNK + 5, 3)
    cid = u.cid_of(data)
    assert u.verify(data, cid)
    assert not u.verify(data[:-1], cid)
    assert not u.verify(data, u.EMPTY_CID)
    assert u.verify(b"", u.EMPTY_CID)
    # a dag-pb CID of another codec than ours: refuse, do not say "corrupt"
    dag_cbor = u.cid_to_str(bytes((1, 0x71, 0x12, 32)) + bytes(32))
    with pytest.raises(u.UnsupportedCid):
        u.verify(data, dag_cbor)


def test_feed_after_cid_refused() -> None:
    h = u.UnixFSHasher()
    h.feed(b"x")
    h.cid()
    assert h.cid() == u.cid_of(b"x")  # idempotent
    with pytest.raises(ValueError):
        h.feed(b"y")


@pytest.mark.parametrize("chunk,links", [(0, 174), (u.MAX_CHUNK_SIZE + 1, 174), (1024, 1), (1024, 0)])
def test_bad_parameters(chunk: int, links: int) -> None:
    with pytest.raises(ValueError):
        u.cid_of(b"x" * 5000, chunk_size=chunk, max_links=links)


def test_memory_is_bounded_by_depth() -> None:
    h = u.UnixFSHasher(chunk_size=1, max_links=4)
    h.feed(bytes(10_000))
    assert all(len(level) <= 4 for level in h._levels)
    assert len(h._levels) <= 8  # log4(10000) < 7


def test_cid_of_file_matches(tmp_path: Path) -> None:
    data = _data(5 * CHUNK + 17, 4)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert u.cid_of_file(path) == u.cid_of(data)
    with open(path, "rb") as f:
        assert u.cid_of_file(f, chunk_size=1000, max_links=3) == u.cid_of(data, chunk_size=1000, max_links=3)


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=5000),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
    chunk=st.integers(min_value=1, max_value=300),
    links=st.integers(min_value=2, max_value=6),
)
def test_feed_split_does_not_matter(data: bytes, cuts: list[int], chunk: int, links: int) -> None:
    h = u.UnixFSHasher(chunk, links)
    last = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        h.feed(data[last:cut])
        last = cut
    h.feed(bytearray(data[last:]))
    root = h.root()
    assert h.cid() == u.cid_of(data, chunk_size=chunk, max_links=links)
    assert root.filesize == len(data) == h.size


# --- against kubo ---------------------------------------------------------------

SIZES = [
    0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK,
    LINKS * CHUNK - 1, LINKS * CHUNK, LINKS * CHUNK + 1, (LINKS + 1) * CHUNK,
]


def test_default_chunker_sizes(kubo: Kubo, tmp_path: Path) -> None:
    """The sizes where the layout changes, at kubo's defaults, one ``ipfs add -r``."""
    folder = tmp_path / "sizes"
    folder.mkdir()
    expected: dict[str, str] = {}
    for i, size in enumerate(SIZES):
        data = _data(size, 100 + i)
        (folder / f"s{size}").write_bytes(data)
        expected[f"sizes/s{size}"] = u.cid_of(data)
    got = kubo.add_tree(folder)
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize("size", [0, 1, CHUNK + 1, LINKS * CHUNK + 1])
def test_kubo_defaults_without_chunker_flag(kubo: Kubo, tmp_path: Path, size: int) -> None:
    """IPDC's ADD_PARAMS name no chunker: kubo's default must be what we assume."""
    path = tmp_path / "f"
    data = _data(size, 7)
    path.write_bytes(data)
    assert kubo.cid_of_path(path, chunk=None) == u.cid_of(data)


def test_streamed_in_odd_pieces_matches_kubo(kubo: Kubo, tmp_path: Path) -> None:
    data = _data(3 * CHUNK + 12345, 8)
    path = tmp_path / "f"
    path.write_bytes(data)
    h = u.UnixFSHasher()
    rng = random.Random(9)
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 7, 4096, CHUNK - 1, CHUNK, CHUNK + 3, 100_000])
        h.feed(data[pos : pos + step])
        pos += step
    assert h.cid() == kubo.cid_of_path(path)


@pytest.mark.parametrize(
    "size",
    [
        LINKS * LINKS * 1024 - 1,
        LINKS * LINKS * 1024,
        LINKS * LINKS * 1024 + 1,  # first depth-3 tree at the default fan-out
        LINKS * LINKS * 1024 + LINKS * 1024 + 1,
    ],
)
def test_depth_three_with_small_chunker(kubo: Kubo, tmp_path: Path, size: int) -> None:
    data = _data(size, size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert kubo.cid_of_path(path, chunk=1024) == u.cid_of(data, chunk_size=1024)


def test_node_bytes_equal_kubo_blocks(kubo: Kubo, tmp_path: Path) -> None:
    """Not only the CID: the root block kubo stores is byte for byte ours."""
    data = _data(3 * 1024 + 10, 11)
    path = tmp_path / "f"
    path.write_bytes(data)
    cid = kubo.run("add", "-Q", "--cid-version=1", "--raw-leaves", "--chunker=size-1024", str(path)).decode().strip()
    block = kubo.run("block", "get", cid)
    leaves = [u.Link(bytes((1, 0x55, 0x12, 32)) + hashlib.sha256(data[i : i + 1024]).digest(),
                     len(data[i : i + 1024]), len(data[i : i + 1024])) for i in range(0, len(data), 1024)]
    assert block == u.file_node_block(leaves)
    assert cid == u.cid_of(data, chunk_size=1024)


def test_flat_directory(kubo: Kubo, tmp_path: Path) -> None:
    folder = tmp_path / "dir"
    folder.mkdir()
    roots: dict[str, u.Link] = {}
    for name, size in [("b.txt", 10), ("a", 0), ("Z", 1024 * 5 + 1), ("é-ü", 2048), ("a.b", 1024)]:
        data = _data(size, len(name))
        (folder / name).write_bytes(data)
        h = u.UnixFSHasher(chunk_size=1024)
        h.feed(data)
        roots[name] = h.root()
    got = kubo.add_tree(folder, chunk=1024)
    assert got["dir"] == u.directory_cid(roots)
    assert u.directory_cid({}) == kubo.add_tree(_empty_dir(tmp_path))["empty"]


def _empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir()
    return path


# Hypothesis: random sizes, tiny chunkers and fan-outs, so deep trees stay small.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40_000), min_size=1, max_size=8),
    chunk=st.sampled_from([1, 2, 3, 64, 100, 1000, 1024, 4096]),
    links=st.one_of(st.none(), st.integers(min_value=2, max_value=12)),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_property_random_sizes(kubo: Kubo, tmp_path_factory: pytest.TempPathFactory,
                               sizes: list[int], chunk: int, links: int | None, seed: int) -> None:
    if chunk <= 3:
        sizes = [s // 100 for s in sizes]  # one block per byte: keep kubo quick
    folder = tmp_path_factory.mktemp("prop") / "p"
    folder.mkdir()
    expected: dict[str, str] = {}
    for i, size in enumerate(sizes):
        data = _data(size, seed + i)
        (folder / f"f{i}").write_bytes(data)
        expected[f"p/f{i}"] = u.cid_of(data, chunk_size=chunk, max_links=links or LINKS)
    got = kubo.add_tree(folder, chunk=chunk, max_links=links)
    assert {k: got[k] for k in expected} == expected


