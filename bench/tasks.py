"""The Python API (ipdc.api) against dask.distributed, in one run on this machine.

Both sides get two workers of one slot each: IPDC's embedded default (a LocalCluster of
2 nodes: mosquitto, kubo and an agent each; tasks in sandboxed runners) and dask's
``LocalCluster(n_workers=2, threads_per_worker=1)``. Measured, in this order, dask first:

1. **submit**: ``submit(inc, i).result()`` one at a time (after a warm-up), p50 and p95;
2. **map**: 10,000 tiny tasks (``inc``), wall time and tasks per second: IPDC's ``map``
   with its default chunking, and with ``chunksize=1`` (one task each, like dask's);
3. **graph**: a 200-task reduction tree (100 leaves, then pair sums), futures as
   arguments, wall time.

    python bench/tasks.py [--submits 300] [--tasks 10000] [--profile]

``--profile`` also samples the submitting process with py-spy during IPDC's submits
(``bench/results/tasks-submit-profile.txt``).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

common.require("dask", "distributed", "cloudpickle")


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def latencies(submit: Callable[[Callable[..., Any], int], Any], n: int) -> list[float]:
    for i in range(20):  # warm-up: runners bound, connections open, functions cached
        submit(inc, i)
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        assert submit(inc, i) == i + 1
        samples.append(time.perf_counter() - t0)
    return samples


def tree(submit: Callable[..., Any], gather: Callable[[Any], int]) -> tuple[float, int]:
    """A 200-task reduction tree over 100 leaves; its wall time and result."""
    t0 = time.perf_counter()
    level = [submit(inc, i) for i in range(100)]
    count = len(level)
    while len(level) > 1:
        pairs = [submit(add, level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
        count += len(pairs)
    leftover = 200 - count  # pad to exactly 200 tasks with a chain on the root
    root = level[0]
    for _ in range(leftover):
        root = submit(add, root, 0)
    value = gather(root)
    return time.perf_counter() - t0, value


def ms(samples: list[float], q: float) -> float:
    return common.percentile([s * 1000 for s in samples], q)


def run_dask(submits: int, tasks: int) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        lat = latencies(lambda f, i: client.submit(f, i, pure=False).result(), submits)
        t0 = time.perf_counter()
        out = client.gather(client.map(inc, range(tasks), pure=False))
        map_s = time.perf_counter() - t0
        assert out == [i + 1 for i in range(tasks)]
        graph_s, value = tree(lambda f, *a: client.submit(f, *a, pure=False), lambda f: f.result())
    return {"submit": lat, "map_s": map_s, "graph_s": graph_s, "graph_value": value}


def run_ipdc(submits: int, tasks: int, profile: bool) -> dict[str, Any]:
    import os
    with common.warm_cluster(2) as cluster:
        from ipdc.api import Swarm
        with Swarm(cluster.nodes[0].home) as swarm:
            spy = None
            if profile:
                out = common.RESULTS / "tasks-submit-profile.txt"
                common.RESULTS.mkdir(exist_ok=True)
                py_spy = str(Path(sys.executable).parent / "py-spy")
                spy = subprocess.Popen([py_spy, "record", "--pid", str(os.getpid()), "--format", "raw",
                                        "--output", str(out), "--rate", "500", "--nonblocking"])
            lat = latencies(lambda f, i: swarm.submit(f, i).result(), submits)
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its profile on Ctrl-C
                spy.wait()
            t0 = time.perf_counter()
            out_chunked = list(swarm.map(inc, range(tasks)))
            map_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out_single = list(swarm.map(inc, range(tasks), chunksize=1))
            map1_s = time.perf_counter() - t0
            assert out_chunked == out_single == [i + 1 for i in range(tasks)]
            graph_s, value = tree(swarm.submit, lambda f: f.result())
    return {"submit": lat, "map_s": map_s, "map1_s": map1_s, "graph_s": graph_s, "graph_value": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(common.machine())
    dask = run_dask(args.submits, args.tasks)
    ipdc = run_ipdc(args.submits, args.tasks, args.profile)
    assert dask["graph_value"] == ipdc["graph_value"]
    n = args.tasks
    rows = [
        ["submit(f).result() p50, ms", f"{ms(ipdc['submit'], 50):.2f}", f"{ms(dask['submit'], 50):.2f}",
         f"{ms(ipdc['submit'], 50) / ms(dask['submit'], 50):.2f}"],
        ["submit(f).result() p95, ms", f"{ms(ipdc['submit'], 95):.2f}", f"{ms(dask['submit'], 95):.2f}",
         f"{ms(ipdc['submit'], 95) / ms(dask['submit'], 95):.2f}"],
        [f"map of {n:,} tiny tasks, tasks/s (IPDC: default chunks)", f"{n / ipdc['map_s']:,.0f}",
         f"{n / dask['map_s']:,.0f}", f"{dask['map_s'] / ipdc['map_s']:.2f}"],
        [f"map of {n:,}, chunksize=1 (one task each), tasks/s", f"{n / ipdc['map1_s']:,.0f}",
         f"{n / dask['map_s']:,.0f}", f"{dask['map_s'] / ipdc['map1_s']:.2f}"],
        ["200-task graph, s", f"{ipdc['graph_s']:.2f}", f"{dask['graph_s']:.2f}",
         f"{ipdc['graph_s'] / dask['graph_s']:.2f}"],
    ]
    common.print_table("Python API vs dask.distributed LocalCluster(2)", ["measure", "IPDC", "dask", "ratio"],
                       rows)
    print("\nratio: IPDC / dask; for tasks/s rows IPDC's rate over dask's (above 1: IPDC is faster)")
    common.save("tasks", {"ipdc": ipdc, "dask": dask, "args": vars(args)})


if __name__ == "__main__":
    main()
