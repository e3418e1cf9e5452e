"""The process that runs user code: ``python -m ipdc.runner``.

User code never runs inside the agent. The agent keeps warm runners (interpreter
started, IPDC imported, no user code loaded), binds one to a job, and sends it
tasks as JSON lines on stdin; answers come back on a private copy of stdout, so
``print`` in user code goes to the runner's log instead of corrupting the protocol.

A runner serves one job only and exits with it, so no import of a job's Map.py or
Reduce.py outlives the job.

Data format between map and reduce: each map task writes one JSON file per
partition, ``[[key, [value, ...]], ...]``. ``json`` escapes lone surrogates, so
input bytes that are not UTF-8 (decoded with ``surrogateescape``) survive intact.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import resource
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from ipdc.kubo import KuboClient

#: Values of one key are combined whenever this many have piled up (see ``combine``).
COMBINE_EVERY = 256


def stable_partition(key: Any, partitions: int) -> int:
    """The partition of ``key``: crc32 of its canonical bytes, the same in every
    process (unlike the salted built-in ``hash``)."""
    if isinstance(key, str):
        data = key.encode("utf-8", "surrogatepass")
    else:
        data = json.dumps(key, sort_keys=True).encode("utf-8", "surrogatepass")
    return zlib.crc32(data) % partitions


def _group_key(key: Any) -> Any:
    """A dict key for ``key``: itself when hashable, else its canonical JSON."""
    if isinstance(key, (list, dict)):
        return ("\0json", json.dumps(key, sort_keys=True))
    return key


def split_lines(text: str) -> list[str]:
    """Lines without their ``\\n``; a final newline does not make an extra empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def map_text(module: ModuleType, text: str) -> dict[Any, tuple[Any, list[Any]]]:
    """Run the user's map (and combine) over one chunk: group key -> (key, values)."""
    combine: Callable[[Any, list[Any]], Any] | None = getattr(module, "combine", None)
    groups: dict[Any, tuple[Any, list[Any]]] = {}
    bulk = getattr(module, "map_chunk", None)
    pairs: Iterable[tuple[Any, Any]]
    if bulk is not None:
        pairs = bulk(text)
    else:
        mapper = module.map
        pairs = (pair for line in split_lines(text) for pair in mapper(line))
    for key, value in pairs:
        try:
            entry = groups.get(key)
        except TypeError:
            entry = groups.get(gk := _group_key(key))
        else:
            gk = key
        if entry is None:
            groups[gk] = (key, [value])
            continue
        values = entry[1]
        values.append(value)
        if combine is not None and len(values) >= COMBINE_EVERY:
            groups[gk] = (key, [combine(key, values)])
    if combine is not None:
        for gk, (key, values) in groups.items():
            if len(values) > 1:
                groups[gk] = (key, [combine(key, values)])
    return groups


def partition_groups(groups: dict[Any, tuple[Any, list[Any]]], partitions: int) -> list[bytes]:
    """Serialise grouped map output into one JSON document per partition, in one pass."""
    buckets: list[list[Any]] = [[] for _ in range(partitions)]
    for key, values in groups.values():
        buckets[stable_partition(key, partitions)].append([key, values])
    return [json.dumps(bucket, separators=(",", ":")).encode() for bucket in buckets]


def reduce_partitions(module: ModuleType, documents: Iterable[bytes]) -> bytes:
    """Merge one partition's map outputs, reduce each key, and format the sorted part."""
    merged: dict[Any, tuple[Any, list[Any]]] = {}
    for document in documents:
        for key, values in json.loads(document):
            gk = _group_key(key)
            entry = merged.get(gk)
            if entry is None:
                merged[gk] = (key, values)
            else:
                entry[1].extend(values)
    results = [(key, module.reduce(key, values)) for key, values in merged.values()]
    try:
        results.sort(key=lambda kv: kv[0])
    except TypeError:  # keys of mixed types: order by type, then canonical JSON
        results.sort(key=lambda kv: (type(kv[0]).__name__, json.dumps(kv[0], sort_keys=True)))
    return "".join(f"{format_field(k)}\t{format_field(v)}\n" for k, v in results).encode(
        "utf-8", "surrogateescape"
    )


def format_field(value: Any) -> str:
    """Strings as they are (like Hadoop's TextOutputFormat), anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def load_module(path: Path, name: str) -> ModuleType:
    """Import a user file under a fresh module name: nothing is shared with other jobs."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Runner:
    """The runner's side of the protocol: one bound job, tasks in sequence."""

    def __init__(self) -> None:
        self.kubo: KuboClient | None = None
        self.mapper: ModuleType | None = None
        self.reducer: ModuleType | None = None
        self.partitions = 0

    def bind(self, req: dict[str, Any]) -> dict[str, Any]:
        os.chdir(req["dir"])
        sys.path.insert(0, req["dir"])
        self.kubo = KuboClient(req["kubo"], timeout=600)
        self.partitions = int(req["partitions"])
        tag = req["job"]
        if req.get("map"):
            self.mapper = load_module(Path(req["map"]), f"ipdc_job_{tag}_map")
        if req.get("reduce"):
            self.reducer = load_module(Path(req["reduce"]), f"ipdc_job_{tag}_reduce")
        return {}

    def map(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.kubo is not None and self.mapper is not None
        t0 = time.perf_counter()
        data = self.kubo.cat(req["cid"])
        t1 = time.perf_counter()
        groups = map_text(self.mapper, data.decode("utf-8", "surrogateescape"))
        t2 = time.perf_counter()
        documents = partition_groups(groups, self.partitions)
        cids = self.kubo.add_streams([(f"part-{i}", io.BytesIO(d)) for i, d in enumerate(documents)])
        t3 = time.perf_counter()
        return {"cids": cids, "stats": {"fetch": t1 - t0, "map": t2 - t1, "store": t3 - t2,
                                        "bytes": float(len(data))}}

    def reduce(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.kubo is not None and self.reducer is not None
        t0 = time.perf_counter()
        documents = [self.kubo.cat(cid) for cid in req["cids"]]
        t1 = time.perf_counter()
        part = reduce_partitions(self.reducer, documents)
        t2 = time.perf_counter()
        cid = self.kubo.add_bytes(part, "part")
        t3 = time.perf_counter()
        return {"cids": [cid], "stats": {"fetch": t1 - t0, "reduce": t2 - t1, "store": t3 - t2}}


def _exit_with_parent() -> None:
    """Die when the agent dies, even by SIGKILL: no orphaned user code."""
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def apply_limits() -> None:
    """Lower our priority and cap CPU, memory and file size before any user code loads."""
    limits = json.loads(os.environ.pop("IPDC_LIMITS", "{}"))
    if not limits:
        return
    os.nice(limits["nice"])
    mb = 1 << 20
    for which, value in ((resource.RLIMIT_CPU, limits["cpu_seconds"]),
                         (resource.RLIMIT_AS, limits["memory_mb"] * mb),
                         (resource.RLIMIT_FSIZE, limits["file_mb"] * mb)):
        resource.setrlimit(which, (value, value))


def main() -> None:
    apply_limits()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    runner = Runner()
    ops = {"bind": runner.bind, "map": runner.map, "reduce": runner.reduce}
    protocol.write('{"ok":true,"ready":true}\n')
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = {"ok": True, **ops[req["op"]](req)}
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()}
        protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
