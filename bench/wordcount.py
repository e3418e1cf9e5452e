"""WordCount on one corpus: ``ipdc mr --k 2`` against the usual Python ways of doing it.

Every variant counts ``str.split()`` tokens of the UTF-8 text (surrogate escapes
for bad bytes), case-sensitively, as jobs/mapreduce/Map.py and Reduce.py do. The
variants run alternately (run 1 of each, then run 2 of each, ...) so that noise
from other users of the machine spreads over all of them, and each runs in its
own process tree, so its peak RSS is its own:

  ipdc-warm        ``ipdc mr --k 2`` on a warm 2-node local cluster (input upload counts)
  ipdc-embedded    ``ipdc mr --k 2`` with no node running: starts and removes a cluster
  counter          one process, collections.Counter over newline-aligned blocks
  pool2            multiprocessing.Pool(2), one Counter per newline-aligned chunk
  dask-counter     dask.distributed LocalCluster(2 workers), one Counter per chunk
  dask-bag         the same cluster, idiomatic dask.bag read_text/flatten/frequencies
  spark-rdd        PySpark local[2]: textFile/flatMap/reduceByKey

The generic path, what jobs without a ``map_chunk`` get: Map.py with ``map_chunk``
removed, so ``map(line)``, ``combine`` and ``reduce`` (bench/generic.py):

  ipdc-generic     ``ipdc mr --k 2 --map <that Map.py>`` on the warm cluster
  pool2-generic    multiprocessing.Pool(2) calling the same functions line by line
  counter-generic  one process doing the same

Every variant's result must hash to the same canonical sha256, or the run fails.

    python bench/wordcount.py                 # the whole corpus, 3 runs of each
    python bench/wordcount.py --size 20MB --runs 1 --variants ipdc-warm,pool2
    python bench/wordcount.py --size 20MB --variants ipdc-warm --slots 2   # the old 2 slots per node

A variant runs as ``python bench/wordcount.py --worker VARIANT INPUT``: it prints
one JSON line with its setup and compute seconds and the result's hash.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import generic

sys.path.insert(0, str(common.REPO))
from ipdc.jobs import shipped
from ipdc.submit.inputs import plan_chunks

CORPUS = common.BENCH / "corpus" / "corpus.txt"
#: Chunks for the chunked variants: ~12 MB each on the full corpus, so two workers
#: stay balanced and no worker holds more than one chunk's token list at a time.
CHUNKS = 16
VARIANTS = ("ipdc-warm", "ipdc-embedded", "counter", "pool2", "dask-counter", "dask-bag", "spark-rdd",
            "ipdc-generic", "pool2-generic", "counter-generic")
BASELINE = "ipdc-warm"
#: The shipped WordCount, whose Map.py the generic variants run without ``map_chunk``.
MAP, REDUCE = shipped("mapreduce", "Map.py"), shipped("mapreduce", "Reduce.py")
DEPS = {"dask-counter": ("dask", "distributed"), "dask-bag": ("dask", "distributed"),
        "spark-rdd": ("pyspark",)}


# -- the variants (each runs in its own process) ------------------------------------------
def count_range(path: str, offset: int, length: int) -> Counter[str]:
    """WordCount of one newline-aligned byte range, exactly as Map.py's map_chunk."""
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read(length).decode("utf-8", "surrogateescape")
    return Counter(text.split())


def merge(counters: Any) -> Counter[str]:
    total: Counter[str] = Counter()
    for counter in counters:
        total.update(counter)
    return total


def run_counter(path: str) -> tuple[float, Callable[[], dict[str, int]]]:
    return 0.0, lambda: merge(count_range(path, off, n) for off, n in plan_chunks(Path(path), CHUNKS))


def run_pool2(path: str) -> tuple[float, Callable[[], dict[str, int]]]:
    from multiprocessing import Pool

    def compute() -> dict[str, int]:
        with Pool(2) as pool:
            ranges = plan_chunks(Path(path), CHUNKS)
            return merge(pool.starmap(count_range, [(path, off, n) for off, n in ranges], chunksize=1))
    return 0.0, compute


def _dask_client() -> Any:
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster)


def run_dask_counter(path: str) -> tuple[float, Callable[[], dict[str, int]]]:
    t = time.perf_counter()
    client = _dask_client()
    setup = time.perf_counter() - t

    def compute() -> dict[str, int]:
        ranges = plan_chunks(Path(path), CHUNKS)
        futures = client.map(count_range, [path] * len(ranges), *zip(*ranges, strict=False), pure=False)
        return client.submit(merge, futures).result()
    return setup, compute


def run_dask_bag(path: str) -> tuple[float, Callable[[], dict[str, int]]]:
    import dask.bag as db

    t = time.perf_counter()
    client = _dask_client()
    setup = time.perf_counter() - t
    blocksize = max(1, math.ceil(os.path.getsize(path) / CHUNKS))

    def compute() -> dict[str, int]:
        bag = db.read_text(path, blocksize=blocksize, encoding="utf-8", errors="surrogateescape")
        return dict(client.compute(bag.map(str.split).flatten().frequencies()).result())
    return setup, compute


def run_spark_rdd(path: str) -> tuple[float, Callable[[], dict[str, int]]]:
    from operator import add

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    t = time.perf_counter()
    spark = (SparkSession.builder.master("local[2]").appName("ipdc-bench-wordcount")
             .config("spark.ui.enabled", "false").config("spark.driver.memory", "4g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    setup = time.perf_counter() - t

    def compute() -> dict[str, int]:
        rdd = spark.sparkContext.textFile(path, minPartitions=CHUNKS)
        return rdd.flatMap(str.split).map(lambda w: (w, 1)).reduceByKey(add).collectAsMap()
    return setup, compute


def generic_map(scratch: Path) -> Path:
    """The shipped Map.py without ``map_chunk``: the job every generic variant runs."""
    return generic.job_without(MAP, scratch / "Map.py", "map_chunk")


def run_generic(processes: int) -> Callable[[str], tuple[float, Callable[[], dict[str, int]]]]:
    def start(path: str) -> tuple[float, Callable[[], dict[str, int]]]:
        scratch = Path(tempfile.mkdtemp(prefix="wordcount-generic-"))
        ranges = plan_chunks(Path(path), CHUNKS)
        return 0.0, lambda: generic.run_local(generic_map(scratch), REDUCE, Path(path), ranges, processes)
    return start


RUNNERS: dict[str, Callable[[str], tuple[float, Callable[[], dict[str, int]]]]] = {
    "counter": run_counter, "pool2": run_pool2, "dask-counter": run_dask_counter,
    "dask-bag": run_dask_bag, "spark-rdd": run_spark_rdd,
    "pool2-generic": run_generic(2), "counter-generic": run_generic(1),
}


def worker(variant: str, path: str) -> None:
    """Run one in-Python variant; print its timings and hash as one JSON line on stdout."""
    setup, compute = RUNNERS[variant](path)
    t = time.perf_counter()
    counts = compute()
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    digest = common.canonical_sha256(counts)
    print(json.dumps({"setup": setup, "compute": seconds, "hash_s": time.perf_counter() - t,
                      "sha256": digest, "words": len(counts)}), flush=True)
    # dask and Spark teardown is not part of the job; a user's script would not wait for it either
    os._exit(0)


# -- the harness ----------------------------------------------------------------------------
def run_variant(variant: str, corpus: Path, cluster: Any, scratch: Path, run: int) -> dict[str, Any]:
    """Run one variant once in its own process tree; wall time, peak RSS, hash."""
    env = dict(os.environ, PYTHONPATH=str(common.REPO))
    roots: list[int] = []
    output = scratch / f"{variant}-{run}"
    if variant.startswith("ipdc"):
        options = ["--map", str(generic_map(scratch))] if variant == "ipdc-generic" else []
        argv = common.ipdc_mr_argv(corpus, output, *options)
        if variant == "ipdc-embedded":
            env["IPDC_HOME"] = str(scratch / f"home-{run}")  # no node there: ipdc mr starts its own
        else:
            env["IPDC_HOME"] = str(cluster.nodes[0].home)
            roots = common.cluster_pids(cluster)
    else:
        argv = [sys.executable, __file__, "--worker", variant, str(corpus)]
    wall, peak_rss, cpu, out = common.run_tree(argv, env, roots)
    if variant.startswith("ipdc"):
        job = json.loads((output / "job.json").read_text())
        counts = common.read_ipdc_output(output)
        figures = {"setup": wall - job["timings"]["total"], "compute": job["timings"]["total"],
                   "sha256": common.canonical_sha256(counts), "words": len(counts), "timings": job["timings"]}
    else:
        figures = json.loads(out.strip().splitlines()[-1])
        wall -= figures.pop("hash_s")  # hashing the result is the benchmark's check, not the job
    return {"variant": variant, "run": run, "wall": wall, "cpu": cpu, "peak_rss": peak_rss, **figures}


def slice_corpus(corpus: Path, size: int) -> Path:
    """The first ``size`` bytes of the corpus, cut back to the last newline (cached)."""
    if size >= corpus.stat().st_size:
        return corpus
    out = corpus.with_name(f"{corpus.stem}-{size}.txt")
    if not out.exists() or out.stat().st_size > size:
        with open(corpus, "rb") as f:
            data = f.read(size)
        out.write_bytes(data[: data.rfind(b"\n") + 1])
    return out


def report(results: list[dict[str, Any]], variants: list[str], size: int, runs: int) -> None:
    """Check that every variant agrees, then print the tables (also from a saved raw file)."""
    hashes = {r["sha256"] for r in results}
    if len(hashes) != 1:
        by = {r["variant"]: r["sha256"] for r in results}
        sys.exit(f"FAIL: the variants disagree on the result: {json.dumps(by, indent=2)}")

    med = {v: {key: common.median(r.get(key, 0.0) for r in results if r["variant"] == v)
               for key in ("wall", "compute", "setup", "cpu", "peak_rss")} for v in variants}
    base = med[BASELINE]["wall"] if BASELINE in med else None
    rows = [[v, f"{m['wall']:.2f}", f"{size / 1e6 / m['wall']:.1f}", f"{m['setup']:.2f}",
             f"{m['compute']:.2f}", f"{m['cpu']:.1f}", common.mb(m["peak_rss"]),
             f"{m['wall'] / base:.2f}x" if base else "-"] for v, m in med.items()]
    common.print_table(
        f"WordCount, {common.mb(size)}, median of {runs} (result sha256 {hashes.pop()[:16]}...)",
        ["variant", "wall s", "MB/s", "setup s", "compute s", "CPU s", "peak RSS (tree)",
         f"wall / {BASELINE}"], rows)
    phases = ("upload", "download", "map", "reduce", "fetch", "total")
    for variant in ("ipdc-warm", "ipdc-generic"):
        timings = [r["timings"] for r in results if r["variant"] == variant]
        if timings:
            common.print_table(f"{variant}: job.json phases, median of {len(timings)} (s)", phases,
                               [[f"{common.median(t.get(p, 0.0) for t in timings):.2f}" for p in phases]])
    print()
    for variant, yardstick, target in (("ipdc-warm", "pool2", 1.15), ("ipdc-generic", "pool2-generic", 1.3)):
        if variant in med and yardstick in med:
            ratio = med[variant]["wall"] / med[yardstick]["wall"]
            cpu = med[variant]["cpu"] / med[yardstick]["cpu"] if med[yardstick]["cpu"] else math.nan
            print(f"target: {variant} <= {target}x {yardstick} wall: {ratio:.2f}x -> "
                  f"{'MET' if ratio <= target else 'NOT MET'} (CPU seconds: {cpu:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--size", type=common.parse_size, help="use only the first SIZE bytes (e.g. 50MB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--runner-nice", type=int, metavar="N",
                        help="the runners' nice value (sandbox.nice; default 19): on a shared machine "
                             "nice 19 runners wait behind every other process")
    parser.add_argument("--slots", type=int, default=0,
                        help="slots per node of the warm cluster (default 0: LocalCluster's, cores / nodes)")
    parser.add_argument("--report", type=Path, metavar="RAW_JSON", help="reprint the tables of a saved run")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "INPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.report:
        raw = json.loads(args.report.read_text())
        runs = raw["runs"]
        variants = list(dict.fromkeys(r["variant"] for r in runs))
        report(runs, variants, raw["bytes"], max(r["run"] for r in runs) + 1)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}")
    common.require("psutil", *{m for v in variants for m in DEPS.get(v, ())})
    if not args.corpus.is_file():
        sys.exit(f"no corpus at {args.corpus}: build it with\n"
                 f"  bash /path/to/shared/corpus/build_corpus.sh {args.corpus.parent}\n"
                 "(see bench/README.md), or pass --corpus FILE")
    corpus = slice_corpus(args.corpus, args.size) if args.size else args.corpus
    size = corpus.stat().st_size
    print(f"WordCount over {corpus} ({common.mb(size)}), {args.runs} run(s) of {', '.join(variants)}")
    print(f"machine: {common.machine()}")

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ipdc-bench-") as tmp, \
            common.warm_cluster(2, slots=args.slots, nice=args.runner_nice) as cluster:
        print(f"ipdc-warm cluster: 2 nodes, {cluster.slots} slot(s) each")
        for run in range(args.runs):
            for variant in variants:
                r = run_variant(variant, corpus, cluster, Path(tmp), run)
                results.append(r)
                print(f"  run {run + 1} {variant:15} {r['wall']:7.2f}s  compute {r['compute']:6.2f}s  "
                      f"peak RSS {common.mb(r['peak_rss']):>8}  {r['words']} words  {r['sha256'][:12]}",
                      flush=True)
    report(results, variants, size, args.runs)
    print(f"raw results: {common.save('wordcount', {'corpus': str(corpus), 'bytes': size, 'runs': results})}")


if __name__ == "__main__":
    main()
