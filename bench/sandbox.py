"""What the sandbox costs: tiny-job latency on a warm cluster, and a runner's start.

* **tiny jobs**: ``MapReduceController.run()`` of a 1 KB WordCount on a warm K-node
  local cluster, wall time per job (the submitter's connections kept open). Every
  task meets a warm spare (bound to the job by sending it the code) or a runner the
  job already holds; its input and outputs go through the agent (fetch, CID check,
  sealed memfds, add).
* **runner start** (``latency.runner_starts``): a cold sandbox until its runner is
  ready, binding it (``load``), one tiny map task on it, and its kill.

    python bench/sandbox.py [--jobs 40] [--k 2] [--starts 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from latency import row, runner_starts, tiny_input

sys.path.insert(0, str(common.REPO))
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import MapReduceController, MapReduceJob

WARMUP = 3


def tiny_jobs(k: int, jobs: int, warm: int, work: Path) -> list[float]:
    """Wall seconds of each tiny job (after WARMUP uncounted ones), ``warm`` spares per agent."""
    walls = []
    with common.warm_cluster(k, settings={"agent": {"warm_runners": warm}}) as cluster:
        node = cluster.nodes[0]
        data = tiny_input(work / "tiny.txt")
        with SwarmClient(node.config, node.signer).connect() as client, node.kubo() as kubo:
            for i in range(WARMUP + jobs):
                job = MapReduceJob(input=data, k=k, output=work / f"out-{i}")
                t = time.perf_counter()
                MapReduceController(client, kubo, job, node.home).run()
                if i >= WARMUP:
                    walls.append(time.perf_counter() - t)
    return walls


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
