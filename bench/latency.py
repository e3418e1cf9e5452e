"""Latency of tiny MapReduce jobs (1 KB input, K=4) on a warm 4-node local cluster,
and where each millisecond of one goes.

Each job runs through the library exactly as ``ipdc mr`` does (one SwarmClient
and one KuboClient kept open, as a long-lived submitter would), and its wall time
is taken around ``MapReduceController.run()``. The controller is the library's,
with timestamps added from outside its logic: its kubo client and its swarm
client are wrapped (every IPFS call, every MQTT send with its signature), the
job's result queue notes when each report arrives, and a few steps are timed.

**Critical path.** Milestones of each job split its wall time into segments that
add up to it exactly:

  check+select   input/code checks (compile), XOR choice of K live peers
  upload         GetResult subscription, staging dir, IPFS add of the code and the input
  download       first Download sent -> last worker ``ready`` (each worker checks the
                 signature, cats Map.py and Reduce.py from IPFS); DoMaps go to each
                 worker as it is ready, so map work overlaps this segment
  map            last ``ready`` -> last map result
  reduce         last map result -> last reduce result (the controller relays each
                 map output to its reducer on Buffer)
  fetch          last reduce result -> every part fetched into the staging dir
  describe       the result directory CID, and its pin
  finish         job.json, _SUCCESS, the rename into place
  cleanup        unsubscribe, CleanUp to each worker, unpin of the input and the code

**Inside the steps** (per task or per call, medians over jobs): what a worker
takes from request to report (DoMap -> map result, last Buffer -> reduce result,
Download -> ready), the runner's own stats from GetResult.stats (IPFS cat, user
code, IPFS add), the rest of it (agent: runner acquire/bind, queueing, decode,
signature check; two MQTT hops), the controller's IPFS calls and MQTT sends, and
how long a report waited in the controller's queue.

For scale, the same run measures a bare MQTT QoS 1 round trip through the
swarm's broker, the start of a user-code runner (fork from the zygote until
ready, then ``bind``: importing the job's code), what the ``ipdc mr`` command
adds around ``run()`` (interpreter and imports, connection and sync), and
dask.distributed's ``client.submit(...).result()`` latency.

    python bench/latency.py [--jobs 100] [--k 4] [--no-dask] [--timeline] [--cli-runs 10]
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

sys.path.insert(0, str(common.REPO))
from ipdc.agent.sandbox import Runner, runner_spec
from ipdc.bus import Bus, client_id
from ipdc.config import SandboxSection
from ipdc.kubo import KuboClient
from ipdc.peers import Peer
from ipdc.spawn import Sandbox
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import JobResult, MapReduceController, MapReduceJob
from ipdc.wire import fdmsg
from ipdc.wire.getresult import GetResult

MILESTONES = ("check+select", "upload", "download", "map", "reduce", "fetch", "describe", "finish", "cleanup")
SEGMENT = {"check+select": "compile Map.py/Reduce.py, XOR choice",
           "upload": "subscribe, IPFS add code + input",
           "download": "Download -> last ready", "map": "last ready -> last map result",
           "reduce": "last map result -> last reduce result", "fetch": "last reduce result -> parts fetched",
           "describe": "result dir CID + pin", "finish": "job.json, _SUCCESS, rename",
           "cleanup": "unsubscribe, CleanUp, unpin"}


class Recorder:
    """Timestamps (``time.perf_counter()``) of one job's steps, from several threads."""

    def __init__(self) -> None:
        self.start = 0.0
        self.marks: dict[str, float] = {}
        self.calls: list[tuple[str, float, float]] = []
        """(what, start, end): IPFS calls ``ipfs <method>`` and MQTT sends ``send <channel>``."""
        self.sends: list[tuple[str, str, float]] = []
        """(channel, node, end of send) for requests to workers."""
        self.arrivals: list[tuple[GetResult, float, float]] = []
        """(report, put on the job's queue, taken by the controller)."""
        self.queued: dict[int, float] = {}
        self._lock = threading.Lock()

    def call(self, what: str, start: float, end: float) -> None:
        with self._lock:
            self.calls.append((what, start, end))

    def mark(self, name: str, when: float | None = None) -> None:
        self.marks.setdefault(name, time.perf_counter() if when is None else when)


class TimedKubo:
    """The controller's KuboClient with every method call timed."""

    def __init__(self, kubo: KuboClient, rec: Recorder) -> None:
        self._kubo, self._rec = kubo, rec

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._kubo, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._rec.call(f"ipfs {name}", t, time.perf_counter())
        return timed


class TimedClient:
    """The shared SwarmClient as one job's controller sees it: sends timed (signing
    included), and the job's result queue noting when each report arrives."""

    def __init__(self, client: SwarmClient, rec: Recorder) -> None:
        self._client, self._rec = client, rec

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def send(self, channel: Any, node: str, message: Any) -> None:
        t = time.perf_counter()
        self._client.send(channel, node, message)
        end = time.perf_counter()
        self._rec.call(f"send {channel.name}", t, end)
        self._rec.sends.append((channel.name, node, end))

    def watch(self, job_id: str) -> queue.Queue[GetResult]:
        results = self._client.watch(job_id)
        put = results.put

        def noted_put(item: GetResult, block: bool = True, timeout: float | None = None) -> None:
            self._rec.queued[id(item)] = time.perf_counter()
            put(item, block, timeout)
        results.put = noted_put  # type: ignore[method-assign]
        return results


class TimedController(MapReduceController):
    """The library's controller, with the milestones of ``Recorder`` marked."""

    def __init__(self, client: SwarmClient, kubo: KuboClient, job: MapReduceJob, home: Path) -> None:
        self.rec = Recorder()
        super().__init__(TimedClient(client, self.rec), TimedKubo(kubo, self.rec), job,  # type: ignore[arg-type]
                         home)

    def run(self) -> JobResult:
        self.rec.start = time.perf_counter()
        return super().run()

    def choose_workers(self) -> list[Peer]:
        t = time.perf_counter()
        try:
            return super().choose_workers()
        finally:
            self.rec.call("select", t, time.perf_counter())
            self.rec.mark("check+select")

    def upload(self) -> list[tuple[int, int]]:
        try:
            return super().upload()
        finally:
            self.rec.mark("upload")

    def handle(self, result: GetResult, fetcher: ThreadPoolExecutor) -> None:
        now = time.perf_counter()
        self.rec.arrivals.append((result, self.rec.queued.pop(id(result), now), now))
        super().handle(result, fetcher)
        if len(self.ready) == len(self.workers):
            self.rec.mark("download", now)
        if self.maps and all(m.cids is not None for m in self.maps):
            self.rec.mark("map", now)
        if self.reduces and all(r.cids is not None for r in self.reduces):
            self.rec.mark("reduce", now)

    def check_fetches(self) -> None:
        super().check_fetches()
        if self.reduces and all(r.fetched for r in self.reduces):
            self.rec.mark("fetch")

    def describe(self, output: Path, ranges: list[tuple[int, int]]) -> JobResult:
        try:
            return super().describe(output, ranges)
        finally:
            self.rec.mark("describe")

    def finish(self, result: JobResult) -> None:
        super().finish(result)
        self.rec.mark("finish")


def breakdown(rec: Recorder, returned: float) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The job's critical-path segments (s, summing to its wall time) and its inner
    figures (s, one value per task or call)."""
    rec.marks["cleanup"] = returned
    segments, last = {}, rec.start
    for name in MILESTONES:
        at = rec.marks.get(name, last)
        segments[name] = at - last
        last = at
    inner: dict[str, list[float]] = defaultdict(list)
    for what, t, end in rec.calls:
        inner[what].append(end - t)
    sent: dict[tuple[str, str], list[float]] = defaultdict(list)
    for channel, node, end in rec.sends:
        sent[(channel, node)].append(end)
    maps_sent: dict[str, list[float]] = {}
    for channel, node, end in rec.sends:
        if channel == "domap":
            maps_sent.setdefault(node, []).append(end)
    for result, queued, taken in rec.arrivals:
        inner["controller queue wait"].append(taken - queued)
        stats = result.stats
        if result.kind == "ready" and sent[("download", result.peer)]:
            inner["worker: Download -> ready"].append(queued - sent[("download", result.peer)][0])
        elif result.kind == "map" and maps_sent.get(result.peer):
            asked = maps_sent[result.peer].pop(0)  # a worker's DoMaps are answered in order at K=4
            took = queued - asked
            inner["worker: DoMap -> map result"].append(took)
            for key in ("fetch", "map", "store"):
                inner[f"  runner map: {key}"].append(stats.get(key, 0.0))
            inner["  rest (agent + 2 MQTT hops)"].append(
                took - sum(stats.get(k, 0.0) for k in ("fetch", "map", "store")))
        elif result.kind == "reduce" and sent[("buffer", result.peer)]:
            took = queued - sent[("buffer", result.peer)][-1]
            inner["worker: last Buffer -> reduce result"].append(took)
            for key in ("fetch", "reduce", "store"):
                inner[f"  runner reduce: {key}"].append(stats.get(key, 0.0))
            inner["  rest (agent + 2 MQTT hops) "].append(
                took - sum(stats.get(k, 0.0) for k in ("fetch", "reduce", "store")))
    return segments, inner


def timeline(rec: Recorder, returned: float) -> list[str]:
    """One job, event by event (ms from the start of run()), for a close look."""
    events = [(t, f"{what} ({(end - t) * 1000:.1f} ms)") for what, t, end in rec.calls]
    events += [(queued, f"report {r.kind} {r.task} from {r.peer} (taken +{(taken - queued) * 1000:.1f} ms)")
               for r, queued, taken in rec.arrivals]
    events += [(t, f"-- {name} done") for name, t in rec.marks.items()]
    events.append((returned, "-- run() returned"))
    return [f"{(t - rec.start) * 1000:8.1f}  {what}" for t, what in sorted(events)]


def tiny_input(path: Path, size: int = 1024) -> Path:
    """``size`` bytes of short English lines (WordCount's natural input)."""
    line = b"the quick brown fox jumps over the lazy dog and the cat\n"
    path.write_bytes((line * (size // len(line) + 1))[:size].rsplit(b"\n", 1)[0] + b"\n")
    return path


def mqtt_round_trips(config: Any, n: int) -> list[float]:
    """QoS 1 publish -> delivery back to the same client, through the swarm's broker."""
    topic = f"ipdc/result/{config.node.name}/bench-rtt"
    samples = []
    with Bus(config.broker, client_id(config.node.name, "bench-rtt"), session_expiry=0) as bus:
        bus.subscribe(topic)
        bus.connect()
        for _ in range(n):
            t = time.perf_counter()
            bus.publish(topic, b"x")
            bus.inbox.get(timeout=10)
            samples.append(time.perf_counter() - t)
    return samples


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
            memfds = [fdmsg.sealed_memfd([data]) for data in code.values()]
            runner.call({"op": "load", "job": f"bench{i}", "partitions": 4, "files": list(code)}, memfds, 60)
            t2 = time.perf_counter()
            task = [fdmsg.sealed_memfd([b"the quick brown fox\n" * 50])]
            _, outputs = runner.call({"op": "map"}, task, 60)
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


def cli_costs(cluster: Any, data: Path, k: int, n: int, out: Path) -> dict[str, list[float]]:
    """What ``ipdc mr`` adds around ``run()`` in a fresh process against the warm cluster:
    the whole command, the interpreter with IPDC's imports, and the connection (with
    its sync on the retained presence messages) and its close."""
    env = {**os.environ, "IPDC_HOME": str(cluster.nodes[0].home)}
    found: dict[str, list[float]] = defaultdict(list)
    for i in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ipdc.cli", "mr", str(data), "--k", str(k), "-q",
                        "-o", str(out / f"cli-{i}")], env=env, check=True, stdout=subprocess.DEVNULL)
        found["ipdc mr (whole command)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import ipdc.cli"], env=env, check=True)
        found["python -c 'import ipdc.cli'"].append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        found["python -c pass"].append(time.perf_counter() - t)
        node = cluster.nodes[0]
        t = time.perf_counter()
        client = SwarmClient(node.config, node.signer).connect()
        found["SwarmClient connect + sync"].append(time.perf_counter() - t)
        t = time.perf_counter()
        client.close()
        found["SwarmClient close"].append(time.perf_counter() - t)
    return found


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
    ms = [s * 1000 for s in samples] or [0.0]
    return [name, f"{common.percentile(ms, 50):.1f}", f"{common.percentile(ms, 95):.1f}",
            f"{common.percentile(ms, 99):.1f}", str(len(samples)), what]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="jobs run first and not counted")
    parser.add_argument("--no-dask", action="store_true", help="skip the dask comparison")
    parser.add_argument("--timeline", action="store_true", help="print the median job's events")
    parser.add_argument("--cli-runs", type=int, default=10, help="runs of the ipdc mr command itself")
    args = parser.parse_args()
    common.require("psutil", *(() if args.no_dask else ("dask", "distributed")))
    print(f"{args.jobs} tiny jobs (1 KB, K={args.k}) on a warm {args.k}-node local cluster")
    print(f"machine: {common.machine()}")

    walls: list[float] = []
    segments: dict[str, list[float]] = defaultdict(list)
    inner: dict[str, list[float]] = defaultdict(list)
    per_call: dict[str, list[float]] = defaultdict(list)
    lines: list[tuple[float, list[str]]] = []
    with tempfile.TemporaryDirectory(prefix="ipdc-bench-") as tmp, common.warm_cluster(args.k) as cluster:
        config = cluster.nodes[0].config
        data = tiny_input(Path(tmp) / "tiny.txt")
        with SwarmClient(config, cluster.nodes[0].signer).connect() as client, \
                cluster.nodes[0].kubo() as kubo:
            for i in range(args.warmup + args.jobs):
                job = MapReduceJob(input=data, k=args.k, output=Path(tmp) / f"out-{i}")
                controller = TimedController(client, kubo, job, cluster.nodes[0].home)
                t = time.perf_counter()
                controller.run()
                returned = time.perf_counter()
                if i < args.warmup:
                    continue
                walls.append(returned - t)
                seg, details = breakdown(controller.rec, returned)
                for name, value in seg.items():
                    segments[name].append(value)
                for name, values in details.items():
                    (per_call if name.startswith(("ipfs ", "send ", "select")) else inner)[name] += values
                for kind in ("ipfs", "send"):
                    inner[f"per job: {kind} total"].append(
                        sum(sum(v) for name, v in details.items() if name.startswith(kind + " ")))
                if args.timeline:
                    lines.append((returned - t, timeline(controller.rec, returned)))
        rtts = mqtt_round_trips(config, 200)
        cli = cli_costs(cluster, data, args.k, args.cli_runs, Path(tmp))
    starts = runner_starts(10, Path(tempfile.mkdtemp(prefix="ipdc-bench-runners-")))
    dask = [] if args.no_dask else dask_submit_latency(args.jobs)

    rows = [row("ipdc job (wall)", walls, "MapReduceController.run()")]
    rows += [row(f"  {name}", segments[name], SEGMENT[name]) for name in MILESTONES]
    common.print_table("Tiny-job latency: critical path (ms; segments add up to each job's wall)",
                       ["what", "p50", "p95", "p99", "n", "measures"], rows)
    totals = {k: v for k, v in inner.items() if k.startswith("per job:")}
    rows = [row(name, inner[name], "per task") for name in inner
            if not name.startswith(("per job:", "controller"))]
    rows += [row("controller queue wait", inner["controller queue wait"],
                 "report queued -> taken, per report")]
    rows += [row(name, values, "per call") for name, values in sorted(per_call.items())]
    rows += [row(name, values, "sum over a job's calls (2 fetches run at a time)")
             for name, values in sorted(totals.items())]
    rows += [row("MQTT QoS 1 round trip", rtts, "publish -> own delivery, swarm broker")]
    rows += [row(name, values, "without a warm spare") for name, values in starts.items()]
    rows += [row(name, values, "fresh process / new connection, warm cluster")
             for name, values in cli.items()]
    if dask:
        rows.append(row("dask client.submit", dask, "2-worker LocalCluster, submit(...).result()"))
    common.print_table("Inside the steps (ms)", ["what", "p50", "p95", "p99", "n", "measures"], rows)
    if lines:
        lines.sort(key=lambda x: x[0])
        wall, events = lines[len(lines) // 2]
        print(f"\n### The median job's events ({wall * 1000:.0f} ms; ms from the start of run())\n")
        print("```\n" + "\n".join(events) + "\n```")
    p50, p95 = common.percentile(walls, 50) * 1000, common.percentile(walls, 95) * 1000
    print(f"\ntarget: p50 <= 80 ms: {p50:.0f} ms -> {'MET' if p50 <= 80 else 'NOT MET'}; "
          f"p95 <= 150 ms: {p95:.0f} ms -> {'MET' if p95 <= 150 else 'NOT MET'}")
    raw = {"walls": walls, "segments": segments, "inner": inner, "calls": per_call, "mqtt": rtts,
           "runner_start": starts, "cli": cli, "dask": dask}
    print(f"raw results: {common.save('latency', raw)}")


if __name__ == "__main__":
    main()
