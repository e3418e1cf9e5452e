"""The partition format (IPDC-KV2) under Hypothesis: whatever JSON data a map emits comes
back exactly (arrays in keys as tuples), and whatever bytes a peer sends are either a
well-formed partition of JSON data or refused with PartitionError, never anything else."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ipdc.wire.partition import MAGIC, PartitionError, read_groups, stable_partition, write_partitions

# Strings with lone surrogates (Cs), as surrogateescape makes of bytes that are not UTF-8.
TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
INTS = st.integers(min_value=-(10**400), max_value=10**400) | st.integers(min_value=-(2**64), max_value=2**64)
SCALARS = TEXT | INTS | st.booleans() | st.none() | st.floats()
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                      | st.dictionaries(TEXT | st.integers(), inner, max_size=4), max_leaves=12)
# Keys never equal to each other across types (True == 1 == 1.0 group together, as in a dict):
# strings, ints, and arrays of them, some holding a dict (unhashable: grouped by JSON).
KEY_ITEMS = st.recursive(TEXT | INTS, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner),
                         max_leaves=6)
KEYS = KEY_ITEMS | st.tuples(TEXT, st.dictionaries(TEXT, INTS, max_size=2))
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_key(x: Any) -> Any:
    """What the reader gives for a key: arrays as tuples, at every depth."""
    if isinstance(x, (list, tuple)):
        return tuple(map(as_key, x))
    return {k: as_key(v) for k, v in x.items()} if isinstance(x, dict) else x


def as_value(x: Any) -> Any:
    """What the reader gives for a value: arrays as lists."""
    if isinstance(x, (list, tuple)):
        return list(map(as_value, x))
    return {k: as_value(v) for k, v in x.items()} if isinstance(x, dict) else x


def read_all(docs: list[bytes]) -> list[tuple[Any, Any]]:
    pairs: list[tuple[Any, Any]] = []
    for p, doc in enumerate(docs):
        keys, entries, single = read_groups(doc)
        for key, entry in zip(keys, entries, strict=True):
            assert stable_partition(key, len(docs)) == p
            pairs.extend((key, value) for value in ([entry] if single else entry))
    return pairs


@FAST
@given(st.lists(st.tuples(KEYS, VALUES), max_size=30), st.integers(1, 5))
@example([("a\udcff\ud800", 10**300), (("t", 1), (1, [2.5, None])), (["t", 1], {"k": True})], 2)
def test_any_json_pairs_round_trip_exactly_into_partitions(pairs: list[tuple[Any, Any]], k: int) -> None:
    got = read_all(write_partitions(pairs, k))
    expected = [(as_key(key), as_value(value)) for key, value in pairs]
    assert sorted(map(repr, got)) == sorted(map(repr, expected))  # repr: True is not 1, (1,) is not [1]


def test_values_keep_their_types_order_and_float_specials() -> None:
    values = [True, 1, 1.0, -0.0, math.inf, math.nan, 2**64, -(2**63) - 1, None, "1", (1, 2)]
    got = [value for _, value in read_all(write_partitions([("k", v) for v in values], 1))]
    assert list(map(repr, got)) == list(map(repr, map(as_value, values)))


@pytest.mark.parametrize("value", [b"bytes", {1, 2}, object(), [{1, 2}]])
def test_a_value_that_is_not_json_is_refused_in_the_map_task(value: object) -> None:
    with pytest.raises(TypeError, match=r"not JSON data|cannot write|serialize"):
        write_partitions([("k", value)], 1)
    with pytest.raises(TypeError, match=r"JSON"):
        write_partitions([(("k", value), 1)], 1)  # a key is checked all the way down


@pytest.mark.parametrize("value", [[b"bytes"], {"a": b"x"}, {("a", 1): 2}, [[bytearray(b"x")]]])
def test_a_value_holding_what_is_not_json_is_refused_by_the_reducer(value: object) -> None:
    (doc,) = write_partitions([("k", value)], 1)  # the map task checks a value's own type only
    with pytest.raises(PartitionError, match=r"bytes|dict key"):
        read_groups(doc)


def test_an_int_past_the_printable_limit_is_refused_in_the_map_task() -> None:
    with pytest.raises(ValueError, match="digits"):
        write_partitions([("k", 10**5000)], 1)


def document(keys: bytes, entries: bytes, n: int = 1, m: int | None = None) -> bytes:
    """A document with these raw sections, for forging."""
    header = b"%s %d %d %d %d\n" % (MAGIC, n, n if m is None else m, len(keys), len(entries))
    return header + keys + entries


FORGED = [
    b"garbage",
    b"\x80\x04\x95pickle",
    MAGIC + b" 1 1 1\n\x91\xa1a",                                                  # a field missing
    document(b"\x91\xa1a", b"\x91\x01")[:-1],                                       # truncated
    document(b"\x91\xa1a", b"\x91\x01") + b"x",                                     # extra byte
    document(b"\x92\xa1a\xa1b", b"\x91\x01", 2),  # fewer entries than keys
    document(b"\x91\xa1a", b"\x91\x01", 2),  # fewer keys than announced
    document(b"\x91\xa1a", b"\x91\x01", 1, 2),  # grouped, but not a list
    document(b"\x91\xa1a", b"\x91\x91\x01", 1, 2),  # fewer values than announced
    document(b"\x91\xc4\x01a", b"\x91\x01"),                                        # a bytes key
    document(b"\x91\xa1a", b"\x91\xd6\xff\x00\x00\x00\x01"),  # a msgpack timestamp
    document(b"\x91\xa1a", b"\x91\xd4\x07\x00"),  # another extension
    document(b"\x91\xa1a", b"\x91\xc7\x03\x0112a"),  # a big int that is no int
    document(b"\x91\xa1a", b"\x91\xc8\x13\x88\x01" + b"9" * 5000),  # past the digit limit
    document(b"\x91\x81\x91\x01\x02", b"\x91\x01"),  # an array as a dict key
    document(b"\x91\xa1a", b"\x91\x81\x91\x01\x02"),                                # ... in a value
    document(b"\x91\xa2\xff\xfe", b"\x91\x01"),  # not UTF-8 at all
    document(b"\x91" * 2000 + b"\x01", b"\x91\x01"),  # nested too deep
    document(b"\xdd\xff\xff\xff\xff", b"\x91\x01"),  # an array longer than it all
    document(b"", b"", 0),  # no keys: not empty
    MAGIC + b" 1 1 " + b"9" * 5000 + b" 1\n",  # a huge length field
    MAGIC + b" -1 1 1 1\n\x91\x91",
]


@pytest.mark.parametrize("doc", FORGED)
def test_forged_documents_are_refused(doc: bytes) -> None:
    with pytest.raises(PartitionError):
        read_groups(doc)


def assert_json_or_refused(doc: bytes) -> None:
    """Reading either raises PartitionError or gives JSON data with hashable-or-dict keys."""
    try:
        keys, entries, single = read_groups(doc)
    except PartitionError:
        return
    for value in keys + (entries if single else [v for e in entries for v in e]):
        check_json(value)


def check_json(x: Any) -> None:
    if isinstance(x, (list, tuple)):
        for item in x:
            check_json(item)
    elif isinstance(x, dict):
        for key, item in x.items():
            assert type(key) in (str, int, float, bool, type(None))
            check_json(item)
    else:
        assert type(x) in (str, int, float, bool, type(None))


MSGPACK_ANY = st.recursive(
    SCALARS.filter(lambda x: not isinstance(x, int) or -(2**63) <= x < 2**64) | st.binary(max_size=4)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=3) | st.integers(0, 9), inner, max_size=3), max_leaves=8)


@FAST
@given(MSGPACK_ANY, MSGPACK_ANY, st.integers(0, 3), st.integers(0, 5))
@example([], "\ud800", 0, 0)
def test_any_msgpack_in_the_sections_is_json_or_refused(keys: Any, entries: Any, n: int, m: int) -> None:
    pack = partial(msgpack.packb, unicode_errors="surrogatepass")  # lone surrogates: invalid UTF-8 inside
    assert_json_or_refused(document(pack(keys), pack(entries), n, m))


@FAST
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=8), st.data())
def test_corrupted_documents_are_json_or_refused(pairs: list[tuple[Any, Any]], data: st.DataObject) -> None:
    (doc,) = write_partitions(pairs, 1)
    at = data.draw(st.integers(0, len(doc) - 1))
    corrupt = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if corrupt == "flip":
        doc = doc[:at] + bytes([doc[at] ^ data.draw(st.integers(1, 255))]) + doc[at + 1:]
    elif corrupt == "cut":
        doc = doc[:at]
    else:
        doc = doc[:at] + data.draw(st.binary(min_size=1, max_size=4)) + doc[at:]
    assert_json_or_refused(doc)


@FAST
@given(st.binary(max_size=64))
def test_random_bytes_are_refused(junk: bytes) -> None:
    assert_json_or_refused(junk)
    assert_json_or_refused(MAGIC + b" " + junk)
