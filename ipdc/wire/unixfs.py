"""The CID kubo gives a byte string, computed locally in pure Python.

IPDC adds every file with ``ipfs add --cid-version=1 --raw-leaves`` and the
default chunker (``size-262144``), sha2-256 and the balanced layout. This module
reproduces that DAG's root CID byte for byte, so a node can

* check that bytes it received (from a peer, a gateway, a cache) are the bytes the
  CID names, without trusting the sender and without a kubo round trip, and
* name a small payload that travels inline in a message, without adding it to kubo.

Only the root CID is produced: the intermediate blocks are hashed and dropped, so
the hasher keeps at most ``max_links`` links per tree level (``O(depth * 174)``
small records; depth is 3 for 7.9 GB, 4 for 1.4 TB) plus one running sha256.

What kubo v0.39 (boxo v0.35 ``ipld/unixfs/importer/balanced``, go-codec-dagpb)
builds, and this module mirrors:

* The file is cut into chunks of exactly ``chunk_size`` bytes (the last one
  shorter, never empty). A file of zero bytes is a single empty chunk.
* Each chunk is a *raw* block: CIDv1, codec raw (0x55), sha2-256 of the chunk.
* One chunk: that raw block is the root (so files of at most 256 KiB have a
  ``bafkrei...`` CID, the sha256 of the whole file).
* More chunks: dag-pb (0x70) nodes of at most ``max_links`` (174 = 8192 // 47)
  children, filled left to right, depth grown as needed: a node at depth ``d``
  holds up to 174 full subtrees of depth ``d - 1``; only the last child of each
  level may be partial. A partial node with one child is still a node; the root is
  never a node with a single child (that child would be the root instead).
* A dag-pb node is a PBNode protobuf written in go-codec-dagpb's canonical order:
  every Link (field 2) first, then Data (field 1). Each PBLink is Hash (field 1,
  the child's binary CID), Name (field 2, *present and empty*: ``12 00``) and Tsize
  (field 3, the child's cumulative block size: the raw chunk length for a leaf,
  the node's own encoded length plus its links' Tsizes for a node).
* Data is a UnixFS ``Data`` protobuf (proto2, fields in number order):
  Type (field 1) = File (2); no Data field (field 2); filesize (field 3) = the
  bytes under the node; blocksizes (field 4) = each child's filesize, one
  *unpacked* varint field per child (proto2 repeated, not ``[packed=true]``).

Text form: multibase ``b`` + RFC 4648 base32, lower case, no padding, which is
what kubo prints for CIDv1.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import BinaryIO, NamedTuple

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_LINKS",
    "EMPTY_CID",
    "Link",
    "UnixFSHasher",
    "UnsupportedCid",
    "cid_of",
    "cid_of_file",
    "cid_to_bytes",
    "cid_to_str",
    "directory_cid",
    "directory_link",
    "file_node_block",
    "verify",
]

#: kubo's default chunker, ``size-262144``.
DEFAULT_CHUNK_SIZE = 262144
#: boxo's ``helpers.DefaultLinksPerBlock``: 8 KiB / 47 bytes per link = 174.
DEFAULT_MAX_LINKS = 174
#: The largest chunk kubo accepts (boxo ``chunker.ChunkSizeLimit``, 1 MiB); larger
#: chunks would make blocks bitswap refuses, so a CID computed with them names
#: nothing kubo could ever serve.
MAX_CHUNK_SIZE = 1048576

#: Multicodec codes: CID codecs and the multihash function.
CODEC_RAW = 0x55
CODEC_DAG_PB = 0x70
MH_SHA2_256 = 0x12

#: The CID of zero bytes: a raw block of nothing (same value as ipdc.kubo.EMPTY_CID).
EMPTY_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"

# Binary CID prefixes: version 1, codec, sha2-256, 32-byte digest. All codes are
# below 0x80, so each varint is a single byte.
_RAW_PREFIX = bytes((0x01, CODEC_RAW, MH_SHA2_256, 32))
_DAG_PB_PREFIX = bytes((0x01, CODEC_DAG_PB, MH_SHA2_256, 32))

# The bytes of a PBLink that do not depend on the child: the Hash tag with the
# CID's length (36 bytes, always), and an empty Name (tag 0x12, length 0) that
# kubo writes because merkledag always sets Name, even to "".
_LINK_HEAD = b"\x0a\x24"
_EMPTY_NAME = b"\x12\x00"
# UnixFS Data Type = File: tag (1, varint) then 2.
_UNIXFS_FILE = b"\x08\x02"
# UnixFS Data Type = Directory: tag (1, varint) then 1; nothing else for a plain dir.
_UNIXFS_DIRECTORY = b"\x08\x01"


class UnsupportedCid(ValueError):
    """A CID this module cannot produce (CIDv0, another hash or codec, another
    multibase), so bytes cannot be checked against it here."""


class Link(NamedTuple):
    """A finished subtree, as its parent's PBLink and UnixFS blocksize need it."""

    cid: bytes
    """The binary CID (36 bytes: version, codec, multihash header, digest)."""
    tsize: int
    """Cumulative size of every block in the subtree: PBLink.Tsize in the parent."""
    filesize: int
    """Bytes of file content under the subtree: the parent's UnixFS blocksize."""


def _varint(n: int) -> bytes:
    """Unsigned LEB128, as protobuf and multiformats write integers."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def cid_to_str(cid: bytes) -> str:
    """Binary CIDv1 to the text kubo prints: ``b`` + lower-case base32, unpadded."""
    return "b" + base64.b32encode(cid).decode("ascii").rstrip("=").lower()


def cid_to_bytes(cid: str) -> bytes:
    """Parse a CIDv1 in base32 (``b...``) to its binary form.

    Only the form this module writes is accepted: a CIDv0 (``Qm...``) or another
    multibase raises :class:`UnsupportedCid` rather than a wrong answer.
    """
    if not cid.startswith("b") or len(cid) < 2 or not cid[1:].islower():
        raise UnsupportedCid(f"not a base32 CIDv1: {cid[:80]!r}")
    body = cid[1:].upper()
    try:
        return base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError as exc:  # binascii.Error is a ValueError
        raise UnsupportedCid(f"bad base32 in CID {cid[:80]!r}: {exc}") from None


def _leaf(chunk_digest: bytes, length: int) -> Link:
    """A raw leaf: its Tsize and filesize are both its length."""
    return Link(_RAW_PREFIX + chunk_digest, length, length)


def _file_node(links: list[Link]) -> Link:
    """Hash the dag-pb UnixFS File node over ``links``; return it as a Link."""
    block = file_node_block(links)
    return Link(
        _DAG_PB_PREFIX + hashlib.sha256(block).digest(),
        len(block) + sum(link.tsize for link in links),
        sum(link.filesize for link in links),
    )


def file_node_block(links: list[Link]) -> bytes:
    """The bytes of the dag-pb UnixFS File node over ``links``.

    The byte layout is the one go-codec-dagpb writes (Links, then Data), with
    the UnixFS Data that boxo's ``FSNode.GetBytes`` writes (see module doc).
    Public so tests can compare it with the block kubo stores.
    """
    filesize = 0
    parts: list[bytes] = []
    blocksizes: list[bytes] = []
    for link in links:
        body = b"".join((_LINK_HEAD, link.cid, _EMPTY_NAME, b"\x18", _varint(link.tsize)))
        parts.append(b"\x12" + _varint(len(body)) + body)
        blocksizes.append(b"\x20" + _varint(link.filesize))
        filesize += link.filesize
    data = b"".join((_UNIXFS_FILE, b"\x18", _varint(filesize), *blocksizes))
    parts.append(b"\x0a" + _varint(len(data)) + data)
    return b"".join(parts)


class UnixFSHasher:
    """Incremental version of :func:`cid_of`: ``feed()`` the bytes in any pieces,
    then ``cid()``.

    Bytes go straight into a running sha256 of the current chunk, never into a
    buffer, so memory does not grow with the input or with ``feed`` sizes: only
    the pending links, at most ``max_links`` per tree level, are kept.

    A finished tree is built lazily: a full level is closed into a node only when
    one more link arrives for it, because a level that is full *at the end* may
    be the root and must not be wrapped in a one-child parent.
    """

    __slots__ = ("_chunk_size", "_leaf", "_leaf_len", "_levels", "_max_links", "_root", "_size")

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, max_links: int = DEFAULT_MAX_LINKS) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}, got {chunk_size}")
        if max_links < 2:
            # boxo loops forever with 1 link per node; 0 or less is refused by kubo.
            raise ValueError(f"max_links must be at least 2, got {max_links}")
        self._chunk_size = chunk_size
        self._max_links = max_links
        self._leaf = hashlib.sha256()
        self._leaf_len = 0
        self._levels: list[list[Link]] = []
        self._size = 0
        self._root: Link | None = None

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next bytes of the file. Any piece size works, including 0."""
        if self._root is not None:
            raise ValueError("feed() after cid(): the hasher is finished")
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        total = len(view)
        self._size += total
        chunk = self._chunk_size
        pos = 0
        if self._leaf_len:
            take = min(chunk - self._leaf_len, total)
            self._leaf.update(view[:take])
            self._leaf_len += take
            pos = take
            if self._leaf_len == chunk:
                self._add(0, _leaf(self._leaf.digest(), chunk))
                self._leaf = hashlib.sha256()
                self._leaf_len = 0
        # Whole chunks straight from the caller's buffer: one sha256 call each,
        # no copy (slicing a memoryview shares the memory).
        sha256 = hashlib.sha256
        while total - pos >= chunk:
            self._add(0, _leaf(sha256(view[pos : pos + chunk]).digest(), chunk))
            pos += chunk
        if pos < total:
            self._leaf.update(view[pos:])
            self._leaf_len += total - pos

    def _add(self, level: int, link: Link) -> None:
        """Append ``link`` at ``level`` (0 = leaves), first closing that level into
        a parent node if it already holds ``max_links`` links."""
        levels = self._levels
        if level == len(levels):
            levels.append([])
        pending = levels[level]
        if len(pending) == self._max_links:
            levels[level] = []
            self._add(level + 1, _file_node(pending))
        levels[level].append(link)

    def root(self) -> Link:
        """Finish the tree and return its root as a :class:`Link`.

        The root's ``tsize`` is kubo's CumulativeSize, which a directory entry
        pointing at this file needs. Idempotent; no ``feed`` is allowed after it.
        """
        if self._root is None:
            if self._leaf_len or not self._levels:
                # The last, short chunk; or the one empty chunk of an empty file.
                self._add(0, _leaf(self._leaf.digest(), self._leaf_len))
                self._leaf_len = 0
            levels = self._levels
            level = 0
            while True:
                top = level == len(levels) - 1
                pending = levels[level]
                if top and len(pending) == 1:
                    self._root = pending[0]
                    break
                node = _file_node(pending)
                levels[level] = []
                if top:
                    self._root = node
                    break
                self._add(level + 1, node)
                level += 1
            self._levels = []
        return self._root

    def cid_bytes(self) -> bytes:
        """Binary form of :meth:`cid`."""
        return self.root().cid

    def cid(self) -> str:
        """The root CID as kubo prints it. Finishes the hasher."""
        return cid_to_str(self.root().cid)


def cid_of(data: bytes | bytearray | memoryview, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
           max_links: int = DEFAULT_MAX_LINKS) -> str:
    """The CID ``ipfs add --cid-version=1 --raw-leaves`` gives ``data``.

    ``chunk_size`` and ``max_links`` match ``--chunker=size-N`` and
    ``--max-file-links=N``; the defaults are kubo's. A payload of at most one
    chunk is one raw block, so it skips the tree machinery: one sha256.
    """
    view = memoryview(data)
    if view.nbytes <= chunk_size:
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}, got {chunk_size}")
        return cid_to_str(_RAW_PREFIX + hashlib.sha256(view).digest())
    hasher = UnixFSHasher(chunk_size, max_links)
    hasher.feed(view)
    return hasher.cid()


def cid_of_file(file: str | os.PathLike[str] | BinaryIO, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                max_links: int = DEFAULT_MAX_LINKS) -> str:
    """The CID of a file's content, read in 1 MiB pieces (constant memory)."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return cid_of_file(f, chunk_size=chunk_size, max_links=max_links)
    hasher = UnixFSHasher(chunk_size, max_links)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while n := file.readinto(view):  # type: ignore[attr-defined]
        hasher.feed(view[:n])
    return hasher.cid()


def verify(data: bytes | bytearray | memoryview, cid: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
           max_links: int = DEFAULT_MAX_LINKS) -> bool:
    """Whether ``data`` is what ``cid`` names under IPDC's import settings.

    False means these bytes, added the way IPDC adds them, do not give ``cid``.
    A CID of a form these settings never produce (CIDv0 ``Qm...``, another hash,
    another codec, another multibase) raises :class:`UnsupportedCid` instead of
    returning False, so that a CID from a differently configured import is not
    mistaken for corrupt data.
    """
    want = _wanted(cid)
    if want[:4] == _RAW_PREFIX and memoryview(data).nbytes > chunk_size:
        return False  # more than one chunk always has a dag-pb root
    return cid_to_bytes(cid_of(data, chunk_size=chunk_size, max_links=max_links)) == want


def verify_file(file: BinaryIO, cid: str) -> bool:
    """:func:`verify` for the bytes of ``file`` from where it stands, read in pieces (constant
    memory): what a worker checks in the memfd it filled from kubo."""
    want = _wanted(cid)
    return cid_to_bytes(cid_of_file(file)) == want


def _wanted(cid: str) -> bytes:
    want = cid_to_bytes(cid)
    if len(want) != 36 or want[:4] not in (_RAW_PREFIX, _DAG_PB_PREFIX):
        raise UnsupportedCid(f"not a CIDv1 raw/dag-pb sha2-256 CID: {cid[:80]!r}")
    return want


def directory_cid(entries: Mapping[str, Link] | Iterable[tuple[str, Link]]) -> str:
    """The CID ``ipfs add -r --cid-version=1 --raw-leaves`` gives a flat directory
    (see :func:`directory_link`)."""
    return cid_to_str(directory_link(entries).cid)


def directory_link(entries: Mapping[str, Link] | Iterable[tuple[str, Link]]) -> Link:
    """A directory node over ``entries``, as its parent's link: nested directories are
    built bottom up by giving a subdirectory's link as an entry.

    ``entries`` maps each name to its :meth:`UnixFSHasher.root` or to a subdirectory's
    :func:`directory_link` (the CID and the cumulative size both go into the directory's
    link). Only a *basic*
    directory is built: links sorted by name (byte order), each with its Name
    and Tsize, and UnixFS Data ``{Type: Directory}`` alone (no mode, no mtime).
    Names must be valid single path components. kubo switches to a HAMT shard
    once the sum of ``len(name) + len(cid)`` over entries reaches 256 KiB; that
    layout is not implemented, so such a directory raises ValueError.
    """
    items = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
    encoded = sorted(((name.encode("utf-8"), link) for name, link in items), key=lambda e: e[0])
    estimate = 0
    parts: list[bytes] = []
    for i, (name, link) in enumerate(encoded):
        if not name or b"/" in name or name in (b".", b".."):
            raise ValueError(f"bad directory entry name: {name!r}")
        if i and encoded[i - 1][0] == name:
            raise ValueError(f"duplicate directory entry name: {name!r}")
        estimate += len(name) + len(link.cid)
        body = b"".join((_LINK_HEAD, link.cid, b"\x12", _varint(len(name)), name, b"\x18",
                         _varint(link.tsize)))
        parts.append(b"\x12" + _varint(len(body)) + body)
    if estimate >= 256 * 1024:
        raise ValueError("directory large enough for kubo to shard it (HAMT): not supported")
    parts.append(b"\x0a" + _varint(len(_UNIXFS_DIRECTORY)) + _UNIXFS_DIRECTORY)
    block = b"".join(parts)
    return Link(_DAG_PB_PREFIX + hashlib.sha256(block).digest(),
                len(block) + sum(link.tsize for _, link in encoded),
                sum(link.filesize for _, link in encoded))
