"""What ``ipdc mr`` reads, and how it is cut into map tasks.

``INPUT`` is one of four things:

* a local file;
* a local directory: every file in it, at any depth (hidden files and directories
  are left out, as ``ipfs add -r`` leaves them out);
* a CID of a UnixFS file or directory the swarm holds;
* an IPFS path ``/ipfs/CID/path`` to a file or directory inside one.

A directory that holds ``part-00000`` is a job's output (a result directory, or the
output directory ``ipdc mr`` wrote): only its ``part-*`` files are read, never
``job.json`` or ``_SUCCESS``, so jobs chain.

Every input has a CID, which names the job's input in its cache key and history: the
one ``ipfs add -r --cid-version=1 --raw-leaves`` gives, computed here for a local input
(:mod:`ipdc.wire.unixfs`), so the same bytes give the same key however they are given.

Chunks never span files: each file is cut into line-aligned byte ranges, and each
chunk carries its file's path inside the input (``docs/a.txt``; the file's own name
for a single file, the CID for a bare file CID), which ``map(line, path)`` receives.
Files are ordered by path, so the same input always gives the same chunks. A local
input's chunks are added to kubo; an input given by CID is never added again: its
chunks are byte ranges of its files, which workers read from the swarm.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ipdc.errors import JobError, KuboError, MessageError
from ipdc.wire.ids import Cid
from ipdc.wire.manifest import MAX_TASKS
from ipdc.wire.unixfs import Link, UnixFSHasher, cid_to_str, directory_link

if TYPE_CHECKING:  # `ipdc mr` parses its INPUT here without loading httpx (~60 ms of its start)
    from ipdc.kubo import KuboClient

#: Seconds to wait for an input's blocks while listing it: a CID that no live peer
#: holds is not waited for forever.
RESOLVE_TIMEOUT = 30.0
#: Bytes read at a time while looking for the end of a line in an input given by CID.
WINDOW = 64 << 10
#: What marks a directory as a job's output, of which only the parts are read.
RESULT_MARK = "part-00000"
#: Files and directories an input may hold, at most: every file is at least one map task,
#: and a job has at most MAX_TASKS. The listing stops there, so a DAG of a few blocks whose
#: directories each link one subdirectory many times (2**60 paths from 60 blocks) fails at
#: once instead of being listed forever.
MAX_ENTRIES = MAX_TASKS
#: Directory levels an input may nest, at most (each level is one recursion of the walk).
MAX_DEPTH = 100

#: ``find(offset)``: the offset just past the first newline at or after ``offset``, or
#: the file's size when there is none.
LineEnd = Callable[[int], int]


@dataclass(frozen=True)
class InputFile:
    path: str
    """Relative to the input: map's second argument."""
    size: int
    local: Path | None = None
    """The file on this node (a local input)."""
    cid: Cid | None = None
    """The file in IPFS (an input given by CID)."""


@dataclass(frozen=True)
class Input:
    cid: str
    """The whole input's CID (a UnixFS file or directory)."""
    files: list[InputFile]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class _Walk:
    """What a walk over an input's tree has taken so far, held to MAX_ENTRIES and MAX_DEPTH."""

    name: str
    entries: int = 0
    listed: dict[Cid, list[tuple[str, Cid, bool, int]]] = field(default_factory=dict)
    """A directory of an input by CID listed once, however many times its DAG links it."""

    def take(self, entries: int, depth: int) -> None:
        self.entries += entries
        if self.entries > MAX_ENTRIES:
            raise JobError(f"input {self.name} holds more than {MAX_ENTRIES} files and directories; a job has "
                           f"at most {MAX_TASKS} map tasks, each file at least one: give a part of it "
                           "(/ipfs/CID/path) or fewer, larger files")
        if depth > MAX_DEPTH:
            raise JobError(f"input {self.name} nests directories more than {MAX_DEPTH} deep")


@dataclass(frozen=True)
class Split:
    """One map task's chunk: ``length`` bytes from ``offset`` of ``file``."""

    file: InputFile
    offset: int
    length: int


def parse_input(text: str) -> Path | str:
    """A local path, or an IPFS reference (a CID, or a path under ``/ipfs/``) as a str.
    A local file or directory of that name wins over a CID."""
    if text.startswith("/ipfs/"):
        return text.rstrip("/")
    if not os.path.exists(text):
        try:
            return str(Cid(text))
        except MessageError:
            pass
    return Path(text)


def input_text(value: Path | str) -> str:
    """How a job's input is written down (history, job.json): a local path absolute."""
    return str(value.absolute()) if isinstance(value, Path) else value


def check_local(path: Path) -> None:
    """Fail at submission on a local input the user can fix at once."""
    if not path.exists():
        raise JobError(f"input {path} does not exist (INPUT is a local file or directory, a CID, or "
                       "/ipfs/CID/path)")
    if not os.access(path, os.R_OK):
        raise JobError(f"input {path} is not readable")


def _result_only(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("part-")] if RESULT_MARK in names else names


# -- local inputs -----------------------------------------------------------------------------
def local_input(path: Path) -> Input:
    """A local file or directory, its files in path order, and its CID (computed here)."""
    check_local(path)
    if path.is_file():
        root = cid_to_str(_hash_file(path).cid)
        return Input(root, [InputFile(path.name, path.stat().st_size, path)])
    files: list[InputFile] = []
    link = _walk_local(path, "", files, _Walk(str(path)), top=True)
    if not files:
        raise JobError(f"input directory {path} holds no file to read (hidden files are left out)")
    return Input(cid_to_str(link.cid), files)


def _hash_file(path: Path) -> Link:
    hasher = UnixFSHasher()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            hasher.feed(block)
    return hasher.root()


def _walk_local(directory: Path, prefix: str, files: list[InputFile], walk: _Walk, top: bool = False) -> Link:
    """Collect ``directory``'s files (in the byte order of their names, as UnixFS sorts
    them) and return its directory link."""
    try:
        names = sorted((e.name for e in os.scandir(directory) if not e.name.startswith(".")),
                       key=lambda n: n.encode("utf-8", "surrogateescape"))
    except OSError as exc:
        raise JobError(f"cannot list input directory {directory}: {exc.strerror}") from None
    _refuse_links(directory, names)
    if top:
        names = _result_only(names)
    walk.take(len(names), prefix.count("/") + 1)
    links: dict[str, Link] = {}
    for name in names:
        child = directory / name
        rel = f"{prefix}{name}"
        if child.is_dir():
            links[name] = _walk_local(child, f"{rel}/", files, walk)
        elif child.is_file():
            links[name] = _hash_file(child)
            files.append(InputFile(rel, child.stat().st_size, child))
    try:
        return directory_link(links)
    except ValueError as exc:  # a name that is not UTF-8, or a directory kubo would shard
        raise JobError(f"input directory {directory} cannot be given a CID here ({exc}); add it with "
                       "`ipfs add -r` and give its CID as INPUT") from None


def _refuse_links(directory: Path, names: list[str]) -> None:
    """A symbolic link inside a local input directory is refused, never followed: following
    it would upload into the swarm (where every member can read it) whatever it points at,
    such as the node's own keys, which the user did not name; and ``ipfs add -r`` stores a
    link, not its target, so the input's CID would not be kubo's."""
    for name in names:
        child = directory / name
        if child.is_symlink():
            raise JobError(f"input directory {directory} holds a symbolic link {name} -> {os.readlink(child)}; "
                           "links inside an input are not followed: copy the file in, or give the "
                           "link's target itself as INPUT")


# -- inputs given by CID ----------------------------------------------------------------------
def cid_input(kubo: KuboClient, ref: str) -> Input:
    """A CID or ``/ipfs/CID/path``: resolved and listed through kubo, never fetched whole."""
    path = ref if ref.startswith("/ipfs/") else f"/ipfs/{ref}"
    try:
        root = kubo.resolve(path, RESOLVE_TIMEOUT)
        kind, size = kubo.stat(root, RESOLVE_TIMEOUT)
        if kind == "file":
            return Input(str(root), [InputFile(path.rsplit("/", 1)[-1], size, cid=root)])
        files: list[InputFile] = []
        _walk_cid(kubo, root, "", files, _Walk(ref), top=True)
    except KuboError as exc:
        raise JobError(f"cannot read input {ref} from the swarm: {exc}. Is it added (`ipfs add -r`) on a "
                       "live node, and the path inside it right?") from None
    if not files:
        raise JobError(f"input {ref} is a directory with no file in it")
    return Input(str(root), files)


def _walk_cid(kubo: KuboClient, cid: Cid, prefix: str, files: list[InputFile], walk: _Walk,
              top: bool = False) -> None:
    if cid not in walk.listed:
        walk.listed[cid] = sorted(kubo.entries(cid, RESOLVE_TIMEOUT),
                                  key=lambda e: e[0].encode("utf-8", "surrogateescape"))
    entries = walk.listed[cid]
    keep = set(_result_only([name for name, *_ in entries])) if top else None
    walk.take(len(entries) if keep is None else len(keep), prefix.count("/") + 1)
    for name, child, is_dir, size in entries:
        if keep is not None and name not in keep:
            continue
        if is_dir:
            _walk_cid(kubo, child, f"{prefix}{name}/", files, walk)
        else:
            files.append(InputFile(f"{prefix}{name}", size, cid=child))


# -- splitting --------------------------------------------------------------------------------
def line_ranges(size: int, chunks: int, line_end: LineEnd) -> list[tuple[int, int]]:
    """Split ``size`` bytes into at most ``chunks`` (offset, length) ranges that end on a
    newline (see :data:`LineEnd`).

    A line longer than a chunk makes fewer, larger chunks; there is always at least
    one range, so an empty file still makes one (empty) map task.
    """
    bounds = [0]
    for i in range(1, chunks):
        target = max(size * i // chunks, bounds[-1])
        if target >= size:
            break
        end = line_end(target)
        if bounds[-1] < end < size:
            bounds.append(end)
    bounds.append(size)
    return [(a, b - a) for a, b in itertools.pairwise(bounds)] or [(0, 0)]


def plan_chunks(path: Path, chunks: int) -> list[tuple[int, int]]:
    """:func:`line_ranges` of a local file."""
    with open(path, "rb") as f:
        def line_end(offset: int) -> int:
            f.seek(offset)
            f.readline()  # run to the end of the line we landed in
            return f.tell()

        return line_ranges(path.stat().st_size, chunks, line_end)


def _remote_line_end(kubo: KuboClient, cid: Cid, size: int, stall: float) -> LineEnd:
    def line_end(offset: int) -> int:
        while offset < size:
            window = kubo.fetch_range(cid, offset, min(WINDOW, size - offset), stall=stall)
            newline = window.find(b"\n")
            if newline >= 0:
                return offset + newline + 1
            offset += len(window)
        return size

    return line_end


def plan_splits(source: Input, chunks: int, kubo: KuboClient | None = None,
                stall: float = RESOLVE_TIMEOUT) -> list[Split]:
    """About ``chunks`` line-aligned chunks over the input's files, each file's share in
    proportion to its size (at least one chunk per file, never one across two). ``kubo``
    reads the line ends of an input given by CID."""
    target = max(1, math.ceil(source.size / chunks))
    splits: list[Split] = []
    for file in source.files:
        n = chunks if len(source.files) == 1 else max(1, math.ceil(file.size / target))
        if file.local is not None:
            ranges = plan_chunks(file.local, n)
        else:
            assert file.cid is not None and kubo is not None
            ranges = line_ranges(file.size, n, _remote_line_end(kubo, file.cid, file.size, stall))
        splits.extend(Split(file, offset, length) for offset, length in ranges)
    return splits

