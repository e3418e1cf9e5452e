"""Latency of tiny MapReduce jobs (1 KB input, K=4) on a warm 4-node local cluster.

Each job runs through the library exactly as ``ipdc mr`` does (one SwarmClient
and one KuboClient kept open, as a long-lived submitter would), and its wall time
is taken around ``MapReduceController.run()``. The breakdown comes from the job's
own timings (the phases in job.json), the runners' stats carried on GetResult,
and a few timers this script adds around library calls:

  select     choosing K peers by XOR distance among the live ones
  upload     IPFS add of Map.py, Reduce.py and the input chunk(s)
  download   Download on MQTT -> each worker cats the code from IPFS -> ``ready`` on MQTT
  map        first DoMap sent -> last map GetResult: runner bind (user code import),
             runner cat + map + add (``runner map`` rows), Buffer/GetResult on MQTT
  reduce     last map result -> last reduce GetResult: runner bind on the reducers that
             did not map, runner cat + reduce + add (``runner reduce`` rows)
  fetch      the submitter cats the K parts, builds the result directory CID, pins it
  finish     job.json/_SUCCESS, CleanUp sent, input and code unpinned

For scale, the same run measures a bare MQTT QoS 1 round trip through the
swarm's broker, the cold start of a user-code runner process (what a warm spare
saves), and dask.distributed's ``client.submit(...).result()`` latency.

    python bench/latency.py [--jobs 100] [--k 4]
"""

from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.REPO))
from channels.getresult import GetResult  # noqa: E402
from ipdc.bus import Bus  # noqa: E402
from ipdc.client import SwarmClient  # noqa: E402
from ipdc.config import SandboxSection  # noqa: E402
from ipdc.kubo import KuboClient  # noqa: E402
from ipdc.mapreduce import JobResult, MapReduceController, MapReduceJob  # noqa: E402
from ipdc.peers import Peer  # noqa: E402
from ipdc.sandbox import RunnerProcess  # noqa: E402

PHASES = ("select", "upload", "download", "map", "reduce", "fetch", "finish")


class TimedController(MapReduceController):
    """The library's controller, plus timers around the steps job.json does not time
    and a record of the runners' own stats from every GetResult."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner_stats: list[tuple[str, dict[str, float]]] = []

    def choose_workers(self) -> list[Peer]:
        t = time.monotonic()
        workers = super().choose_workers()
        self.timings["select"] = time.monotonic() - t
        return workers

    def _next(self, results: "queue.Queue[GetResult]", workers: list[Peer], what: str) -> GetResult:
        result = super()._next(results, workers, what)
        if result.stats:
            self.runner_stats.append((result.kind, result.stats))
        return result

    def finish(self, result: JobResult, staging: Path) -> None:
        t = time.monotonic()
        super().finish(result, staging)
        self.timings["finish"] = time.monotonic() - t


def tiny_input(path: Path, size: int = 1024) -> Path:
    """``size`` bytes of short English lines (WordCount's natural input)."""
    line = b"the quick brown fox jumps over the lazy dog and the cat\n"
    path.write_bytes((line * (size // len(line) + 1))[:size].rsplit(b"\n", 1)[0] + b"\n")
    return path


def mqtt_round_trips(config: Any, n: int) -> list[float]:
    """QoS 1 publish -> delivery back to the same client, through the swarm's broker."""
    topic = f"ipdc/result/{config.node.name}/bench-rtt"
    samples = []
    with Bus(config.broker, f"{config.node.name}-bench-rtt", session_expiry=0) as bus:
        bus.subscribe(topic)
        bus.connect()
        for _ in range(n):
            t = time.perf_counter()
            bus.publish(topic, b"x")
            bus.inbox.get(timeout=10)
            samples.append(time.perf_counter() - t)
    return samples


def runner_cold_starts(n: int, log_dir: Path) -> list[float]:
    """Start ``python -m ipdc.runner`` until its ready line: the cost a warm spare hides."""
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        runner = RunnerProcess(SandboxSection(), log_dir)
        runner.wait_ready(timeout=60)
        samples.append(time.perf_counter() - t)
        runner.kill()
    return samples


def dask_submit_latency(n: int) -> list[float]:
    """client.submit(f, x).result() on a 2-worker dask.distributed LocalCluster."""
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.submit(abs, -1, pure=False).result()  # warm: the first call ships the function
        samples = []
        for i in range(n):
            t = time.perf_counter()
            client.submit(abs, -i, pure=False).result()
            samples.append(time.perf_counter() - t)
    return samples


def row(name: str, samples: list[float], what: str = "") -> list[str]:
    ms = [s * 1000 for s in samples]
    return [name, f"{common.percentile(ms, 50):.1f}", f"{common.percentile(ms, 95):.1f}",
            f"{common.percentile(ms, 99):.1f}", str(len(ms)), what]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="jobs run first and not counted")
    args = parser.parse_args()
    common.require("psutil", "dask", "distributed")
    print(f"{args.jobs} tiny jobs (1 KB, K={args.k}) on a warm {args.k}-node local cluster")
    print(f"machine: {common.machine()}")

    walls: list[float] = []
    phases: dict[str, list[float]] = defaultdict(list)
    stats: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="ipdc-bench-") as tmp, common.warm_cluster(args.k) as cluster:
        config = cluster.nodes[0].config
        data = tiny_input(Path(tmp) / "tiny.txt")
        with SwarmClient(config).connect() as client, KuboClient(config.kubo_api_url) as kubo:
            for i in range(args.warmup + args.jobs):
                job = MapReduceJob(input=data, k=args.k, output=Path(tmp) / f"out-{i}")
                controller = TimedController(client, kubo, job)
                t = time.perf_counter()
                controller.run()
                wall = time.perf_counter() - t
                if i < args.warmup:
                    continue
                walls.append(wall)
                for phase in PHASES:
                    phases[phase].append(controller.timings.get(phase, 0.0))
                # finish as reported: job.json/_SUCCESS plus what run() does after "total" (CleanUp, unpin)
                phases["finish"][-1] = wall - controller.timings["total"] + controller.timings.get("finish", 0.0)
                for kind, st in controller.runner_stats:
                    for key, value in st.items():
                        if key != "bytes":
                            stats[f"runner {kind}: {key}"].append(value)
        rtts = mqtt_round_trips(config, 200)
    colds = runner_cold_starts(10, Path(tempfile.gettempdir()) / "ipdc-bench-runners")
    dask = dask_submit_latency(args.jobs)

    what = {"select": "XOR choice among live peers", "upload": "IPFS add (code + input)",
            "download": "Download -> code cat -> ready (MQTT + IPFS)",
            "map": "DoMap -> all map GetResults", "reduce": "last map -> all reduce GetResults",
            "fetch": "IPFS cat of K parts + result dir + pin", "finish": "job.json, CleanUp, unpin"}
    rows = [row("ipdc job (wall)", walls, "MapReduceController.run()")]
    rows += [row(f"  {p}", phases[p], what[p]) for p in PHASES]
    rows += [row(f"    {k}", v, "inside the runner (GetResult.stats)") for k, v in sorted(stats.items())]
    rows += [row("MQTT QoS 1 round trip", rtts, "publish -> own delivery, swarm broker"),
             row("runner cold start", colds, "python -m ipdc.runner until ready"),
             row("dask client.submit", dask, "2-worker LocalCluster, submit(...).result()")]
    common.print_table("Tiny-job latency (ms)", ["what", "p50", "p95", "p99", "n", "measures"], rows)
    p50, p95 = common.percentile(walls, 50) * 1000, common.percentile(walls, 95) * 1000
    print(f"\ntarget: p50 <= 80 ms: {p50:.0f} ms -> {'MET' if p50 <= 80 else 'NOT MET'}; "
          f"p95 <= 150 ms: {p95:.0f} ms -> {'MET' if p95 <= 150 else 'NOT MET'}")
    print(f"raw results: {common.save('latency', {'walls': walls, 'phases': phases, 'runner': stats, 'mqtt': rtts, 'runner_cold': colds, 'dask': dask})}")


if __name__ == "__main__":
    main()
