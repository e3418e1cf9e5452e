"""What the sandbox costs: tiny-job latency on a warm cluster, and a runner's start.

* **tiny jobs**: ``MapReduceController.run()`` of a 1 KB WordCount on a warm K-node
  local cluster, wall time per job (the submitter's connections kept open). Every
  task meets a warm spare (bound to the job by sending it the code) or a runner the
  job already holds; its input and outputs go through the agent (fetch, CID check,
  sealed memfds, add).
* **runner start**: a cold sandbox until its runner is ready, binding it (``load``),
  one tiny map task on it, and its kill.

    python bench/sandbox.py [--jobs 40] [--k 2] [--starts 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from latency import tiny_input

sys.path.insert(0, str(common.REPO))
from ipdc.agent.sandbox import Runner, runner_spec
from ipdc.config import SandboxSection
from ipdc.spawn import Sandbox
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import MapReduceController, MapReduceJob
from ipdc.wire import fdmsg

WARMUP = 3


def tiny_jobs(k: int, jobs: int, warm: int, work: Path) -> list[float]:
    """Wall seconds of each tiny job (after WARMUP uncounted ones), ``warm`` spares per agent."""
    walls = []
    with common.warm_cluster(k, settings={"agent": {"warm_runners": warm}}) as cluster:
        node = cluster.nodes[0]
        data = tiny_input(work / "tiny.txt", 1024)
        with SwarmClient(node.config, node.signer).connect() as client, node.kubo() as kubo:
            for i in range(WARMUP + jobs):
                job = MapReduceJob(input=data, k=k, output=work / f"out-{i}")
                t = time.perf_counter()
                MapReduceController(client, kubo, job, node.home).run()
                if i >= WARMUP:
                    walls.append(time.perf_counter() - t)
    return walls


def runner_starts(n: int, work: Path) -> dict[str, list[float]]:
    """What a task pays for a runner. Cold: a sandbox started (zygote fork, cgroups, uid
    switch, bubblewrap, the interpreter, the runner's imports) until its runner is ready.
    Then, as for a warm spare: ``load`` (the job's Map.py and Reduce.py sent as memfds and
    imported) and one tiny map task (input memfd in, partitions memfd out)."""
    jobs = common.REPO / "ipdc" / "jobs" / "mapreduce"
    code = {name: (jobs / name).read_bytes() for name in ("Map.py", "Reduce.py")}
    settings = SandboxSection()
    spec = runner_spec(settings)
    out: dict[str, list[float]] = defaultdict(list)
    t = time.perf_counter()
    sandbox = Sandbox(work / "logs")
    out["sandbox open (zygote start, probe)"].append(time.perf_counter() - t)
    try:
        for i in range(n + 1):
            t0 = time.perf_counter()
            runner = Runner(sandbox.start(spec), settings)
            runner.wait_ready()
            t1 = time.perf_counter()
            memfds = [fdmsg.sealed_memfd([data], name) for name, data in code.items()]
            runner.call({"op": "load", "job": f"bench{i}", "partitions": 4, "files": list(code), "stages": None},
                        memfds, 60)
            t2 = time.perf_counter()
            task = [fdmsg.sealed_memfd([b"the quick brown fox\n" * 50])]
            _, outputs = runner.call({"op": "map", "path": ""}, task, 60)
            fdmsg.close_all(memfds + task + outputs)
            t3 = time.perf_counter()
            runner.kill()
            t4 = time.perf_counter()
            if i:  # the first one warms the page cache
                out["cold sandbox start -> runner ready"].append(t1 - t0)
                out["load job code (a warm spare's bind)"].append(t2 - t1)
                out["tiny map task on a bound runner"].append(t3 - t2)
                out["kill + cgroup removal"].append(t4 - t3)
    finally:
        sandbox.close()
    return out


def row(name: str, samples: list[float], what: str = "") -> list[str]:
    ms = [s * 1000 for s in samples] or [0.0]
    return [name, f"{common.percentile(ms, 50):.1f}", f"{common.percentile(ms, 95):.1f}",
            f"{common.percentile(ms, 99):.1f}", str(len(samples)), what]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--warm", type=int, default=1, help="agent.warm_runners of each node")
    args = parser.parse_args()
    print(f"machine: {common.machine()}")
    with tempfile.TemporaryDirectory(prefix="ipdc-bench-sandbox-") as tmp:
        walls = tiny_jobs(args.k, args.jobs, args.warm, Path(tmp))
        starts = runner_starts(args.starts, Path(tmp))
    title = f"tiny job, K={args.k}, {args.warm} warm spare(s) (wall)"
    rows = [row(title, walls, "MapReduceController.run()")]
    rows += [row(name, values, "per runner") for name, values in starts.items()]
    common.print_table("Sandbox costs (ms)", ["what", "p50", "p95", "p99", "n", "per"], rows)
    common.save("sandbox", {"tiny_job_walls": walls, "runner_starts": starts})


if __name__ == "__main__":
    main()
