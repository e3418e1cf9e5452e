"""The Python API (ipdc.api) against dask.distributed, in one run on this machine.

Both sides get two workers of one slot each: IPDC's embedded default (a LocalCluster of
2 nodes: mosquitto, kubo and an agent each; tasks in sandboxed runners) and dask's
``LocalCluster(n_workers=2, threads_per_worker=1)``, both running for the whole run. They
take turns (``--rounds``, alternating who goes first), so both meet the same load on a
shared machine:

1. **submit**: ``submit(inc, i).result()`` one at a time (after a warm-up), p50 and p95;
2. **map**: 10,000 tiny tasks (``inc``), wall time and tasks per second: IPDC's ``map``
   with its default chunking, and with ``chunksize=1`` (one task each, like dask's);
3. **graph**: a 200-task reduction tree (100 leaves, then pair sums), futures as
   arguments, wall time.

    python bench/tasks.py [--submits 300] [--tasks 10000] [--rounds 3] [--profile]

``--profile`` also samples the submitting process with py-spy during IPDC's submits
(``bench/results/tasks-submit-profile.txt``), after the rounds.
"""

from __future__ import annotations

import argparse
import os
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


class Side:
    """One system under test, as the measurements call it."""

    def __init__(self, name: str, submit: Callable[..., Any],
                 maps: dict[str, Callable[[int], list[int]]]) -> None:
        self.name = name
        self.submit = submit
        """``submit(f, *args)``: a future."""
        self.maps = maps
        """Variant -> ``map(inc, range(n))`` as a list."""
        self.figures: dict[str, list[float]] = {"submit": []}


def measure(sides: list[Side], submits: int, tasks: int, rounds: int) -> None:
    """Every measurement, the sides taking turns (in alternating order) so that both meet
    the same load on a shared machine."""
    for side in sides:  # warm-up: runners bound, connections open, functions cached
        latencies(lambda f, i, s=side: s.submit(f, i).result(), 20)
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            side.figures["submit"] += latencies(lambda f, i, s=side: s.submit(f, i).result(),
                                                submits // rounds)
            for variant, run in side.maps.items():
                t0 = time.perf_counter()
                assert run(tasks) == [i + 1 for i in range(tasks)]
                side.figures.setdefault(variant, []).append(time.perf_counter() - t0)
            seconds, value = tree(side.submit, lambda f: f.result())
            assert value == sum(range(1, 101))
            side.figures.setdefault("graph", []).append(seconds)


def profile_submits(swarm: Any, n: int) -> Path:
    """py-spy's samples of this process during ``n`` IPDC submits (raw, one stack a line)."""
    out = common.RESULTS / "tasks-submit-profile.txt"
    common.RESULTS.mkdir(exist_ok=True)
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()),
                            "--format", "raw", "--output", str(out), "--rate", "500", "--nonblocking"])
    latencies(lambda f, i: swarm.submit(f, i).result(), n)
    spy.send_signal(signal.SIGINT)  # py-spy writes its profile on Ctrl-C
    spy.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submits", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(common.machine())
    from distributed import Client, LocalCluster

    dask_cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with common.warm_cluster(2) as cluster, dask_cluster, Client(dask_cluster) as client:
        from ipdc.api import Swarm
        with Swarm(cluster.nodes[0].home) as swarm:
            dask = Side("dask", lambda f, *a: client.submit(f, *a, pure=False),
                        {"map": lambda n: client.gather(client.map(inc, range(n), pure=False))})
            ipdc = Side("IPDC", swarm.submit, {"map": lambda n: list(swarm.map(inc, range(n))),
                                               "map1": lambda n: list(swarm.map(inc, range(n), chunksize=1))})
            measure([dask, ipdc], args.submits, args.tasks, args.rounds)
            profile = profile_submits(swarm, args.submits) if args.profile else None
    n = args.tasks
    i, d = ipdc.figures, dask.figures
    med = common.median
    rows = [
        ["submit(f).result() p50, ms", f"{ms(i['submit'], 50):.2f}", f"{ms(d['submit'], 50):.2f}",
         f"{ms(i['submit'], 50) / ms(d['submit'], 50):.2f}"],
        ["submit(f).result() p95, ms", f"{ms(i['submit'], 95):.2f}", f"{ms(d['submit'], 95):.2f}",
         f"{ms(i['submit'], 95) / ms(d['submit'], 95):.2f}"],
        [f"map of {n:,} tiny tasks, tasks/s (IPDC: default chunks)", f"{n / med(i['map']):,.0f}",
         f"{n / med(d['map']):,.0f}", f"{med(d['map']) / med(i['map']):.2f}"],
        [f"map of {n:,}, chunksize=1 (one task each), tasks/s", f"{n / med(i['map1']):,.0f}",
         f"{n / med(d['map']):,.0f}", f"{med(d['map']) / med(i['map1']):.2f}"],
        ["200-task graph, s", f"{med(i['graph']):.2f}", f"{med(d['graph']):.2f}",
         f"{med(i['graph']) / med(d['graph']):.2f}"],
    ]
    common.print_table(f"Python API vs dask.distributed LocalCluster(2), {args.rounds} interleaved rounds",
                       ["measure", "IPDC", "dask", "ratio"], rows)
    print("\nratio: IPDC / dask; for tasks/s rows IPDC's rate over dask's (above 1: IPDC is faster); "
          "map and graph rows are medians of the rounds")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if profile is not None:
        print(f"py-spy profile of {args.submits} IPDC submits: {profile}")
    common.save("tasks", {"ipdc": i, "dask": d, "args": vars(args)})


if __name__ == "__main__":
    main()
