"""Python API tasks inside the runner, and the value codec both ends share.

A task is a cloudpickled function (fetched by the agent by CID and checked against
it), its arguments (each an encoded value, see below) and the names of the keyword
ones. The runner calls it and hands back the result encoded, or the exception.

Values are encoded by :func:`encode`, as ``(codec, bytes)``:

* ``msgpack``: None, bool, 64-bit int, float, str, bytes, and lists, tuples and dicts
  of them (a tuple is kept a tuple). Decoding it runs no code.
* ``ndarray``: a numpy array of a dtype without Python objects, as a small msgpack
  header (dtype, shape) and its raw buffer. Decoding it runs no code either.
* ``pickle``: anything else, with cloudpickle. Unpickling is code execution, so the
  submitter accepts it only from a worker whose node key it trusts
  (:mod:`ipdc.api.swarm`); in the runner, only the trusted submitter's arguments are
  unpickled.
"""

from __future__ import annotations

import pickle
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from ipdc.errors import ValueRefused

#: msgpack extension code of a tuple (its items packed as an array).
TUPLE_EXT = 1


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is made of msgpack's types only (and no deeper than 64)."""
    if depth > 64:
        return False
    kind = type(value)
    if value is None or kind in (bool, float, str, bytes):
        return True
    if kind is int:
        return bool(-(1 << 63) <= value < (1 << 64))
    if kind in (list, tuple):
        return all(_plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(type(k) in (str, int, bytes) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _ext(value: Any) -> msgpack.ExtType:
    if type(value) is tuple:
        return msgpack.ExtType(TUPLE_EXT, msgpack.packb(list(value), default=_ext, strict_types=True))
    raise TypeError(f"cannot pack {type(value).__name__}")


def _unext(code: int, data: bytes) -> Any:
    if code != TUPLE_EXT:
        raise ValueError(f"unknown msgpack extension {code}")
    return tuple(_unpack(data))


def _unpack(data: bytes) -> Any:
    # msgpack bounds every length by the bytes given: a hostile value cannot make us allocate more
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_unext)


def _is_array(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and type(value) is numpy.ndarray and not value.dtype.hasobject


def encode(value: Any, pickler: Callable[[Any], bytes] | None = None) -> tuple[str, bytes]:
    """``(codec, bytes)`` of ``value``: msgpack or a raw array when it can be, else a pickle
    (``pickler``, cloudpickle's ``dumps`` by default)."""
    if _plain(value):
        return "msgpack", msgpack.packb(value, default=_ext, strict_types=True, use_bin_type=True)
    if _is_array(value):
        header = msgpack.packb([value.dtype.str, list(value.shape)])
        return "ndarray", len(header).to_bytes(4, "big") + header + value.tobytes(order="C")
    if pickler is None:
        import cloudpickle
        pickler = cloudpickle.dumps
    return "pickle", pickler(value)


def decode(codec: str, data: bytes | memoryview, allow_pickle: bool) -> Any:
    """The value of ``data``; a pickle only when ``allow_pickle`` (it runs code)."""
    try:
        if codec == "msgpack":
            return _unpack(bytes(data))
        if codec == "ndarray":
            import numpy
            size = int.from_bytes(bytes(data[:4]), "big")
            dtype_text, shape = _unpack(bytes(data[4:4 + size]))
            dtype = numpy.dtype(dtype_text)
            if dtype.hasobject:
                raise ValueError("an array of Python objects is not raw data")
            return numpy.frombuffer(data[4 + size:], dtype=dtype).reshape(shape).copy()
        if codec == "pickle":
            if not allow_pickle:
                raise ValueRefused("a pickled value was refused: unpickling runs code")
            return pickle.loads(data)
    except ValueRefused:
        raise
    except Exception as exc:
        raise ValueRefused(f"a {codec} value does not decode: {type(exc).__name__}: {exc}") from None
    raise ValueRefused(f"unknown codec {codec!r}")


def run(function: bytes, args: Sequence[tuple[str, bytes | memoryview]], kwargs: Sequence[str],
        chunk: bool) -> tuple[bool, str, bytes, str]:
    """Call the task: ``(ok, codec, bytes, traceback)``. ``chunk``: the one positional
    argument is a list of items and the result the list of ``function(item)``.

    The function and arguments come from the job's trusted submitter, so they are
    unpickled here; what user code raises comes back pickled when it can be (the
    submitter re-raises it), else as its text.
    """
    try:
        fn = pickle.loads(function)
        values = [decode(codec, data, allow_pickle=True) for codec, data in args]
        split = len(values) - len(kwargs)
        positional, named = values[:split], dict(zip(kwargs, values[split:], strict=True))
        result = [fn(item) for item in positional[0]] if chunk else fn(*positional, **named)
        codec, data = encode(result)
        return True, codec, data, ""
    except MemoryError:  # a limit: the runner reports it and exits (ipdc.runner.process)
        raise
    except (Exception, SystemExit) as exc:  # what user code raises is the task's outcome
        trace = traceback.format_exc()
        try:
            codec, data = encode(exc)
        except Exception:  # an exception that does not pickle travels as its text
            codec, data = encode(f"{type(exc).__name__}: {exc}")
        return False, codec, data, trace
