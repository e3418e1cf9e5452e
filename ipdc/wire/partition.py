"""The partition document: one map task's output for one reducer, and the key groups
both sides of the shuffle work in.

A document crosses peers, so it is parsed, never unpickled. One partition is::

    IPDC-KV2 <n> <m> <keys bytes> <values bytes>\n
    <msgpack array of the n keys><msgpack array of n entries>

It holds each key once with all the values its map task has for it: ``m`` values in
all. When ``m == n`` (every key has one value, as after ``combine``), the entry of a key
is its value; otherwise it is the array of its values. So a reducer merges key by key,
not value by value, and every byte is decoded by msgpack's C code: nothing is parsed
record by record in Python, and no list per key is made where one value would do.

What round-trips (the JSON data model, exactly):

* strings, including lone surrogates (input bytes that are not UTF-8, decoded with
  ``surrogateescape``): they are written with ``surrogatepass``, so the output gives
  back the input's bytes;
* ints of any size up to Python's limit for printing one (4300 digits, as for the JSON
  output): those outside 64 bits travel as a msgpack extension holding their digits;
* floats, booleans (never folded into ints), None, lists and dicts (with string,
  number, boolean or None keys, as ``json.dumps`` accepts).

Arrays come back as lists in values and as **tuples** in keys, at every depth: the keys
section is decoded with ``use_list=False``. So an array key is hashable at the reducer,
and ``("t", 1)`` and ``["t", 1]`` are one key, as they are in JSON (and in the
partition a key goes to, :func:`stable_partition`).

Reading is bounded: msgpack refuses lengths beyond the document and nests at most 1024
deep, big ints are held to Python's digit limit, and a document holding anything IPDC
never writes (bytes, msgpack timestamps or other extensions, a map key that is an
array) is refused. Whatever is wrong, the reader raises :class:`PartitionError` and
nothing else. An empty partition is zero bytes: the empty CID, never added to kubo.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, ItemsView, Iterable, Iterator
from itertools import chain, compress, repeat
from operator import is_, itemgetter
from typing import Any, NamedTuple

import msgpack

#: First word of every partition document: its format and version.
MAGIC = b"IPDC-KV2"
#: The msgpack extension code of an int outside 64 bits (its decimal digits, ASCII).
BIG_INT = 1
#: A key's values are combined whenever this many have piled up (see :meth:`KeyGroups.add_pairs`).
COMBINE_EVERY = 256

_SCALARS = frozenset({str, int, float, bool, type(None)})
_DIGITS = re.compile(rb"-?[1-9][0-9]*")
#: The deepest nesting msgpack's C unpacker reads (its stack): no value read is deeper.
_MAX_DEPTH = 1024
#: Digits of a header field (a document is far below 10**20 bytes), and so the most
#: bytes a header line can have.
_MAX_FIELD = 20
_MAX_HEADER = len(MAGIC) + 4 * (1 + _MAX_FIELD) + 1


class PartitionError(ValueError):
    """A map output that is not a well-formed partition document."""


#: ``json.dumps(key, sort_keys=True)`` without making an encoder per call (a tuple key
#: takes 1.3 µs instead of 2.2).
_canonical_json = json.JSONEncoder(sort_keys=True).encode


def stable_partition(key: Any, partitions: int) -> int:
    """The partition of ``key``: crc32 of its canonical bytes (a string's UTF-8, anything
    else's JSON with sorted keys), the same in every process, unlike the salted built-in
    ``hash``. Tuples and lists are both JSON arrays, so they go to the same partition."""
    if isinstance(key, str):
        data = key.encode("utf-8", "surrogatepass")
    else:
        data = _canonical_json(key).encode("utf-8", "surrogatepass")
    return zlib.crc32(data) % partitions


class _JsonKey:
    """A key holding a dict, which cannot be hashed: hashed and compared by its canonical
    JSON instead, so that it can still be grouped."""

    __slots__ = ("json", "key")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.json = _canonical_json(key)

    def __hash__(self) -> int:
        return hash(self.json)

    def __eq__(self, other: object) -> bool:
        return type(other) is _JsonKey and other.json == self.json


def _user_key(key: Any) -> Any:
    return key.key if type(key) is _JsonKey else key


def _tuples(value: Any) -> Any:
    return tuple(map(_tuples, value)) if isinstance(value, (list, tuple)) else value


def _hashable(key: Any) -> Any:
    """The group key of a key that ``hash`` refused: its arrays as tuples (as the reader
    gives them, so a list key and a tuple key with the same items are one key), or, when
    it holds a dict, a :class:`_JsonKey`."""
    key = _tuples(key)
    try:
        hash(key)
    except TypeError:
        return _JsonKey(key)
    return key


class KeyGroups:
    """Values gathered by key: what a map task writes and what a reducer merges.

    Keys are grouped by equality (``1``, ``1.0`` and ``True`` are one key, as in a
    dict). A key holding a list is grouped, and handed to ``combine``, with its arrays
    as tuples; one holding a dict by its canonical JSON. Iterating yields
    ``(key, value)`` pairs, so a ``KeyGroups`` is what :func:`write_partitions` takes,
    without grouping again.
    """

    __slots__ = ("by_key", "wrapped")

    def __init__(self) -> None:
        self.by_key: dict[Any, list[Any]] = {}
        self.wrapped = False
        """Whether some key in ``by_key`` is a :class:`_JsonKey` stand-in."""

    def add_pairs(self, pairs: Iterable[tuple[Any, Any]],
                  combine: Callable[[Any, list[Any]], Any] | None = None) -> None:
        """Group pairs by key; with ``combine``, fold a key's values into one whenever
        :data:`COMBINE_EVERY` have piled up, so memory stays bounded by the keys.

        This is the one loop of the generic map path that runs per pair, so it does no
        more than a dict lookup and an append (measured: a ``defaultdict`` is no faster).
        """
        by_key = self.by_key
        get = by_key.get
        for key, value in pairs:
            try:
                values = get(key)
            except TypeError:
                key = _hashable(key)
                self.wrapped |= type(key) is _JsonKey
                values = get(key)
            if values is None:
                by_key[key] = [value]
            else:
                values.append(value)
                if combine is not None and len(values) >= COMBINE_EVERY:
                    by_key[key] = [combine(_user_key(key), values)]

    def combine_all(self, combine: Callable[[Any, list[Any]], Any]) -> None:
        """Fold every key that holds more than one value into one."""
        by_key = self.by_key
        for key, values in by_key.items():
            if len(values) > 1:
                by_key[key] = [combine(_user_key(key), values)]

    def add_columns(self, columns: Columns) -> None:
        """Merge one document's keys and values (its value lists are taken over)."""
        by_key = self.by_key
        get = by_key.get
        for key, entry in zip(columns.keys, columns.values, strict=True):
            try:
                found = get(key)
            except TypeError:  # a key holding a dict
                key = _JsonKey(key)
                self.wrapped = True
                found = get(key)
            if found is None:
                by_key[key] = [entry] if columns.single else entry
            elif columns.single:
                found.append(entry)
            else:
                found.extend(entry)

    def keys(self) -> list[Any]:
        """The keys, as they were given (arrays in keys read from a document are tuples)."""
        return list(map(_user_key, self.by_key)) if self.wrapped else list(self.by_key)

    def sorted_items(self) -> Iterator[tuple[Any, list[Any]]]:
        """(key, values) in the order of the keys; keys that do not compare with each other
        (mixed types) in the order of their type's name, then of their canonical JSON."""
        by_key = self.by_key
        order: list[Any]
        try:
            order = sorted(by_key, key=_user_key) if self.wrapped else sorted(by_key)
        except TypeError:
            order = sorted(by_key, key=_mixed_order)
        return ((_user_key(key), by_key[key]) for key in order)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for key, values in self.by_key.items():
            key = _user_key(key)
            for value in values:
                yield key, value


def _mixed_order(key: Any) -> tuple[str, str]:
    key = _user_key(key)
    return type(key).__name__, _canonical_json(key)


class Columns(NamedTuple):
    """One document's content: its keys, and for each key either its one value
    (``single``: every key of the document has one) or the list of its values."""

    keys: list[Any]
    values: list[Any]
    single: bool


# -- writing ----------------------------------------------------------------------------
def write_partitions(pairs: Iterable[tuple[Any, Any]], partitions: int) -> list[bytes]:
    """One document per partition (format in the module docstring).

    ``pairs`` that are a :class:`KeyGroups` or a dict's items (``map_chunk``'s
    ``Counter(...).items()``) hold each key once and are split as they are; any other
    pairs are grouped by key first. A key that is not JSON data, or a value that is
    not, raises TypeError here, in the map task. What a value holds inside is checked by
    the reducer (:func:`read_groups`): checking it here too, in every map task, cost
    as much as packing it (values that map created one by one lie all over memory).
    """
    items: Iterable[tuple[Any, Any]]
    if isinstance(pairs, ItemsView):
        items, single = pairs, True
    else:
        if not isinstance(pairs, KeyGroups):
            groups = KeyGroups()
            groups.add_pairs(pairs)
            pairs = groups
        lists = pairs.by_key.values()
        single = max(map(len, lists), default=1) == 1
        items = zip(pairs.keys(), map(itemgetter(0), lists) if single else lists, strict=True)
    keys: list[list[Any]] = [[] for _ in range(partitions)]
    entries: list[list[Any]] = [[] for _ in range(partitions)]
    crc32 = zlib.crc32
    for key, entry in items:
        if type(key) is str:
            p = crc32(key.encode("utf-8", "surrogatepass")) % partitions
        else:
            p = stable_partition(key, partitions)
        keys[p].append(key)
        entries[p].append(entry)
    return [_document(Columns(k, e, single)) for k, e in zip(keys, entries, strict=True)]


def _document(columns: Columns) -> bytes:
    keys, entries, single = columns
    if not keys:  # zero bytes: the empty CID, which needs no kubo add at all
        return b""
    values = entries if single else list(chain.from_iterable(entries))
    if len(values) == len(keys) and not single:  # one value a key here: entries are the values
        entries, single = values, True
    try:
        _check_json(keys, (list, tuple))
        _check_json(values, (list, tuple), depth=1)
    except PartitionError as exc:
        raise TypeError(f"map output is not JSON data: {exc} (see README, 'Writing a job')") from None
    try:
        key_bytes, value_bytes = _pack(keys, None), _pack(entries, None)
    except UnicodeEncodeError:  # a lone surrogate: the slower packer that carries them
        key_bytes, value_bytes = _pack(keys, "surrogatepass"), _pack(entries, "surrogatepass")
    header = b"%s %d %d %d %d\n" % (MAGIC, len(keys), len(values), len(key_bytes), len(value_bytes))
    return b"".join((header, key_bytes, value_bytes))


def _pack(obj: Any, unicode_errors: str | None) -> bytes:
    packed: bytes = msgpack.Packer(default=_big_int, unicode_errors=unicode_errors).pack(obj)
    return packed


def _big_int(obj: Any) -> msgpack.ExtType:
    """msgpack's hook for what it cannot pack itself: ints outside 64 bits, as digits
    (``str`` refuses more than 4300 of them, the limit the JSON output has too)."""
    if type(obj) is int:
        return msgpack.ExtType(BIG_INT, str(obj).encode())
    raise TypeError(f"cannot write a {type(obj).__name__} in a partition")


# -- reading ----------------------------------------------------------------------------
def read_groups(document: bytes) -> Columns:
    """Parse one partition (format in the module docstring); keys' arrays are tuples.

    It comes from another peer, so every length and count is checked and every value's
    type too; a malformed document raises PartitionError and nothing in it is executed.
    """
    if not document:
        return Columns([], [], True)
    end = document.find(b"\n", 0, _MAX_HEADER)
    fields = document[:end].split(b" ")
    if end < 0 or len(fields) != 5 or fields[0] != MAGIC or not all(f.isdigit() and len(f) <= _MAX_FIELD
                                                                    for f in fields[1:]):
        raise PartitionError(f"not an IPDC partition (starts with {document[:20]!r})")
    n, m, key_len, value_len = (int(f) for f in fields[1:])
    body = memoryview(document)[end + 1:]  # the sections are read in place, not copied
    if key_len + value_len != len(body):
        raise PartitionError("partition sections do not add up to its length")
    try:
        keys = _unpack(body[:key_len], use_list=False)
        entries = _unpack(body[key_len:], use_list=True)
    except PartitionError:
        raise
    except TypeError:  # msgpack made a dict of a map whose key is an array: unhashable
        raise PartitionError("a dict key that is not a string, number, boolean or None") from None
    except (ValueError, msgpack.UnpackException) as exc:  # not msgpack, not UTF-8, too deep
        raise PartitionError(f"unreadable partition: {exc}") from None
    if type(keys) is not tuple or type(entries) is not list or not len(keys) == len(entries) == n or not n:
        raise PartitionError(f"partition announces {n} keys but does not hold {n} keys and entries")
    single = m == n
    if single:
        values = entries
    elif set(map(type, entries)) != {list} or sum(map(len, entries)) != m:
        raise PartitionError(f"partition announces {m} values but does not hold {n} lists of {m} values")
    else:
        values = list(chain.from_iterable(entries))
    keys = list(keys)
    _check_json(keys, (tuple,))
    _check_json(values, (list,))
    return Columns(keys, entries, single)


def read_partition(document: bytes) -> tuple[list[str], list[int], list[list[Any]]]:
    """Adapter for callers written against the KV1 reader, in its shape: (string keys,
    their int values, every other ``[key, value]`` pair). The data path uses
    :func:`read_groups`."""
    keys: list[str] = []
    values: list[int] = []
    other: list[list[Any]] = []
    columns = read_groups(document)
    for key, entry in zip(columns.keys, columns.values, strict=True):
        for value in [entry] if columns.single else entry:
            if type(key) is str and type(value) is int:
                keys.append(key)
                values.append(value)
            else:
                other.append([key, value])
    return keys, values, other


def _unpack(data: memoryview, use_list: bool) -> Any:
    return msgpack.unpackb(data, use_list=use_list, raw=False, strict_map_key=False,
                           unicode_errors="surrogatepass", ext_hook=_read_ext)


def _read_ext(code: int, data: bytes) -> int:
    if code != BIG_INT or not _DIGITS.fullmatch(data):
        raise PartitionError(f"a msgpack extension IPDC does not write (code {code})")
    return int(data)  # ValueError past Python's digit limit


def _check_json(items: list[Any], arrays: tuple[type, ...], depth: int = _MAX_DEPTH) -> None:
    """Raise PartitionError unless every item is JSON data, down to ``depth`` levels (1:
    the items' own types): a scalar, an array of one of the ``arrays`` types, or a dict
    whose keys are scalars.

    It goes level by level with C iterators (``map``, ``compress``, ``chain``), so the
    cost is a few passes over the data at C speed, not a Python call per value. Read
    data has exact types; subclasses (an ``IntEnum``, a ``str`` subclass) pass, as
    ``json.dumps`` takes them.
    """
    level = items
    for down in range(depth - 1, -1, -1):
        containers = set(map(type, level)) - _SCALARS
        for kind in containers:
            if not issubclass(kind, (*arrays, dict)) and not _is_scalar(kind):
                raise PartitionError(f"a {kind.__name__} where only JSON data may be")
        if not down or not containers:
            return
        inner: list[Iterable[Any]] = []
        for kind in containers:
            found = compress(level, map(is_, map(type, level), repeat(kind)))
            if issubclass(kind, arrays):
                inner.append(chain.from_iterable(found))
            elif issubclass(kind, dict):
                dicts = list(found)
                if not all(map(_is_scalar, set(map(type, chain.from_iterable(dicts))))):
                    raise PartitionError("a dict key that is not a string, number, boolean or None")
                inner.append(chain.from_iterable(map(dict.values, dicts)))
        level = list(chain.from_iterable(inner))


def _is_scalar(kind: type) -> bool:
    return kind in _SCALARS or issubclass(kind, (str, int, float))
