"""The partition document: one map task's output for one reducer.

It crosses peers, so it is parsed, never unpickled. One partition is::

    IPDC-KV1 <n> <keys bytes> <values bytes> <json bytes>\\n
    <n keys joined by \\n, UTF-8 with surrogatepass><n ints joined by \\n><JSON pairs>

The common case, string keys with int values, is two columns that are joined,
split and converted at C speed; any other pair goes to a JSON array of
``[key, value]``. Both keep lone surrogates (input bytes that are not UTF-8, decoded
with ``surrogateescape``), so the output gives back the same bytes. A key may come
more than once; reduce gets all its values. An empty partition is zero bytes: the
empty CID, which is never added to kubo.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from typing import Any

#: First word of every partition document: its format and version.
MAGIC = b"IPDC-KV1"


def stable_partition(key: Any, partitions: int) -> int:
    """The partition of ``key``: crc32 of its canonical bytes, the same in every
    process (unlike the salted built-in ``hash``)."""
    if isinstance(key, str):
        data = key.encode("utf-8", "surrogatepass")
    else:
        data = json.dumps(key, sort_keys=True).encode("utf-8", "surrogatepass")
    return zlib.crc32(data) % partitions


def write_partitions(pairs: Iterable[tuple[Any, Any]], partitions: int) -> list[bytes]:
    """One document per partition (format in the module docstring), in one pass over the pairs."""
    keys: list[list[str]] = [[] for _ in range(partitions)]
    values: list[list[int]] = [[] for _ in range(partitions)]
    other: list[list[list[Any]]] = [[] for _ in range(partitions)]
    crc32 = zlib.crc32
    for key, value in pairs:
        if type(key) is str and type(value) is int:
            p = crc32(key.encode("utf-8", "surrogatepass")) % partitions
            keys[p].append(key)
            values[p].append(value)
        else:
            other[stable_partition(key, partitions)].append([key, value])
    return [_document(*columns) for columns in zip(keys, values, other)]


def _document(keys: list[str], values: list[int], other: list[list[Any]]) -> bytes:
    if not keys and not other:  # zero bytes: the empty CID, which needs no kubo add at all
        return b""
    text = "\n".join(keys)
    if text.count("\n") != max(len(keys) - 1, 0):  # some key holds a newline: it goes to JSON
        columns = [(k, v) for k, v in zip(keys, values) if "\n" not in k]
        other = other + [[k, v] for k, v in zip(keys, values) if "\n" in k]
        keys = [k for k, _ in columns]
        values = [v for _, v in columns]
        text = "\n".join(keys)
    key_bytes = text.encode("utf-8", "surrogatepass")
    value_bytes = "\n".join(map(str, values)).encode()
    json_bytes = json.dumps(other, separators=(",", ":")).encode() if other else b""
    header = b"%s %d %d %d %d\n" % (MAGIC, len(keys), len(key_bytes), len(value_bytes), len(json_bytes))
    return b"".join((header, key_bytes, value_bytes, json_bytes))


class PartitionError(ValueError):
    """A map output that is not a well-formed partition document."""


def read_partition(document: bytes) -> tuple[list[str], list[int], list[Any]]:
    """Parse one partition: (string keys, their int values, other [key, value] pairs).

    It comes from another peer, so every length and count is checked; a malformed
    document raises PartitionError and nothing in it is executed.
    """
    if not document:
        return [], [], []
    try:
        return _parse_partition(document)
    except PartitionError:
        raise
    except ValueError as exc:  # a number or the JSON did not parse
        raise PartitionError(f"unreadable partition: {exc}") from None


def _parse_partition(document: bytes) -> tuple[list[str], list[int], list[Any]]:
    header, _, body = document.partition(b"\n")
    fields = header.split(b" ")
    if len(fields) != 5 or fields[0] != MAGIC:
        raise PartitionError(f"not an IPDC partition (starts with {document[:20]!r})")
    n, key_len, value_len, json_len = (int(f) for f in fields[1:])
    if min(n, key_len, value_len, json_len) < 0 or key_len + value_len + json_len != len(body):
        raise PartitionError("partition sections do not add up to its length")
    keys: list[str] = []
    values: list[int] = []
    if n:
        keys = body[:key_len].decode("utf-8", "surrogatepass").split("\n")
        values = list(map(int, body[key_len:key_len + value_len].split(b"\n")))
        if len(keys) != n or len(values) != n:
            raise PartitionError(f"partition announces {n} keys but holds {len(keys)} keys, {len(values)} values")
    elif key_len or value_len:
        raise PartitionError("partition announces no keys but has key or value bytes")
    other: list[Any] = json.loads(body[key_len + value_len:]) if json_len else []
    if not isinstance(other, list) or not all(isinstance(p, list) and len(p) == 2 for p in other):
        raise PartitionError("partition's JSON section is not a list of [key, value] pairs")
    return keys, values, other


