"""A generic job with tuple keys and dict values: ``ipdc mr --k 2`` against plain Python.

The job (bench/jobs/weather/) computes, per (station, year, element) of a GHCN-Daily
style CSV, the lowest, highest and mean reading and their count: ``map(line)`` yields
``(station, year, element) -> {"min", "max", "sum", "count"}``, ``combine`` merges such
dicts, ``reduce`` finishes them. The CSV is synthetic and deterministic (a fixed seed),
made once under bench/corpus/ (about 30 bytes a reading). Variants, run alternately,
each in its own process tree:

  ipdc-generic     ``ipdc mr --k 2 --map Map.py --reduce Reduce.py`` on a warm 2-node cluster
  pool2-generic    multiprocessing.Pool(2) calling the same functions line by line
  counter-generic  one process doing the same (bench/generic.py): the target's yardstick

``--no-combine`` runs the same job with ``combine`` removed from Map.py: every reading
then crosses the shuffle, as in a job whose author wrote no combine.

    python bench/weather.py                      # 100 MB, 3 runs of each
    python bench/weather.py --size 10MB --runs 1 --no-combine

Every variant's result must hash to the same canonical sha256, or the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import generic

sys.path.insert(0, str(common.REPO))
from ipdc.submit.inputs import plan_chunks

JOB = common.BENCH / "jobs" / "weather"
VARIANTS = ("ipdc-generic", "pool2-generic", "counter-generic")
YARDSTICK, TARGET = "counter-generic", 0.8
#: Chunks of the plain-Python variants, as bench/wordcount.py uses.
CHUNKS = 16
STATIONS, YEARS, ELEMENTS = 200, range(1990, 2020), ("TMAX", "TMIN", "PRCP")
#: Readings as GHCN-Daily holds them, tenths of a unit; one in fifty is flagged.
READINGS = [str(v) for v in range(-400, 451)]
FLAGS = [""] * 49 + ["X"]


def make_data(path: Path, size: int, seed: int = 13) -> Path:
    """``size`` bytes (to the line) of readings drawn from a seeded generator: the same
    file on every machine, so results and their hash are comparable across runs."""
    if path.exists() and path.stat().st_size >= size * 0.99:
        return path
    rng = random.Random(seed)
    stations = [f"USC00{n:06d}" for n in rng.sample(range(10**6), STATIONS)]
    dates = [f"{y}{m:02d}{d:02d}" for y in YEARS for m in range(1, 13) for d in range(1, 29)]
    written, n = 0, 100_000
    with open(path.with_suffix(".tmp"), "w") as f:
        while written < size:
            rows = zip(rng.choices(stations, k=n), rng.choices(dates, k=n), rng.choices(ELEMENTS, k=n),
                       rng.choices(READINGS, k=n), rng.choices(FLAGS, k=n), strict=True)
            block = "".join(f"{s},{d},{e},{v},{q}\n" for s, d, e, v, q in rows)
            if written + len(block) > size:  # the last block, cut after its last whole line
                block = block[: block.rfind("\n", 0, size - written) + 1]
                if not block:
                    break
            written += f.write(block)
    path.with_suffix(".tmp").rename(path)
    return path


def job_files(scratch: Path, combine: bool) -> tuple[Path, Path]:
    """Map.py and Reduce.py of the job, Map.py without ``combine`` when asked."""
    mapper = JOB / "Map.py" if combine else generic.job_without(JOB / "Map.py", scratch / "Map.py", "combine")
    return mapper, JOB / "Reduce.py"


def worker(variant: str, path: str, map_file: str) -> None:
    """Run one plain-Python variant; print its compute seconds and hash as one JSON line."""
    processes = 2 if variant == "pool2-generic" else 1
    t = time.perf_counter()
    ranges = plan_chunks(Path(path), CHUNKS)
    result = generic.run_local(Path(map_file), JOB / "Reduce.py", Path(path), ranges, processes)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    digest = common.canonical_sha256(result)
    print(json.dumps({"compute": seconds, "hash_s": time.perf_counter() - t, "sha256": digest,
                      "keys": len(result)}), flush=True)


def run_variant(variant: str, data: Path, files: tuple[Path, Path], cluster: Any, scratch: Path,
                run: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(common.REPO))
    if variant == "ipdc-generic":
        output = scratch / f"{variant}-{run}"
        argv = common.ipdc_mr_argv(data, output, "--map", str(files[0]), "--reduce", str(files[1]))
        env["IPDC_HOME"] = str(cluster.nodes[0].home)
        wall, peak, cpu, _ = common.run_tree(argv, env, common.cluster_pids(cluster))
        job = json.loads((output / "job.json").read_text())
        result = common.read_ipdc_output(output, json.loads, json.loads)
        figures = {"compute": job["timings"]["total"], "sha256": common.canonical_sha256(result),
                   "keys": len(result), "timings": job["timings"]}
    else:
        wall, peak, cpu, out = common.run_tree([sys.executable, __file__, "--worker", variant, str(data),
                                                str(files[0])], env)
        figures = json.loads(out.strip().splitlines()[-1])
        wall -= figures.pop("hash_s")
    return {"variant": variant, "run": run, "wall": wall, "cpu": cpu, "peak_rss": peak, **figures}


def report(results: list[dict[str, Any]], size: int, title: str) -> None:
    hashes = {r["sha256"] for r in results}
    if len(hashes) != 1:
        sys.exit(f"FAIL: the variants disagree: {json.dumps({r['variant']: r['sha256'] for r in results})}")
    variants = list(dict.fromkeys(r["variant"] for r in results))
    med = {v: {k: common.median(r[k] for r in results if r["variant"] == v)
               for k in ("wall", "compute", "cpu", "peak_rss")} for v in variants}
    base = med[YARDSTICK]["wall"] if YARDSTICK in med else None
    rows = [[v, f"{m['wall']:.2f}", f"{size / 1e6 / m['wall']:.1f}", f"{m['compute']:.2f}", f"{m['cpu']:.1f}",
             common.mb(m["peak_rss"]), f"{m['wall'] / base:.2f}x" if base else "-"] for v, m in med.items()]
    runs = max(r["run"] for r in results) + 1
    common.print_table(
        f"{title}, {common.mb(size)}, median of {runs} (result sha256 {hashes.pop()[:16]}...)",
        ["variant", "wall s", "MB/s", "compute s", "CPU s", "peak RSS (tree)", f"wall / {YARDSTICK}"], rows)
    timings = [r["timings"] for r in results if r["variant"] == "ipdc-generic"]
    if timings:
        phases = ("upload", "download", "map", "reduce", "fetch", "total")
        common.print_table(f"ipdc-generic: job.json phases, median of {len(timings)} (s)", phases,
                           [[f"{common.median(t.get(p, 0.0) for t in timings):.2f}" for p in phases]])
    if base and "ipdc-generic" in med:
        ratio = med["ipdc-generic"]["wall"] / base
        cpu = med["ipdc-generic"]["cpu"] / med[YARDSTICK]["cpu"]
        print(f"\ntarget: ipdc-generic <= {TARGET}x {YARDSTICK} wall: {ratio:.2f}x -> "
              f"{'MET' if ratio <= TARGET else 'NOT MET'} (CPU seconds: {cpu:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=common.parse_size, default=100 * 10**6,
                        help="bytes of CSV (default 100MB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--no-combine", action="store_true", help="the job without combine")
    parser.add_argument("--runner-nice", type=int, metavar="N", help="the runners' nice value (default 19)")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "INPUT", "MAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variant(s) {', '.join(sorted(set(variants) - set(VARIANTS)))}")
    common.require("psutil")
    (common.BENCH / "corpus").mkdir(exist_ok=True)
    data = make_data(common.BENCH / "corpus" / f"weather-{args.size}.csv", args.size)
    size = data.stat().st_size
    title = f"Weather statistics{' without combine' if args.no_combine else ''}"
    print(f"{title} over {data} ({common.mb(size)}), {args.runs} run(s) of {', '.join(variants)}")
    print(f"machine: {common.machine()}")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ipdc-bench-") as tmp, \
            common.warm_cluster(2, nice=args.runner_nice) as cluster:
        files = job_files(Path(tmp), combine=not args.no_combine)
        for run in range(args.runs):
            for variant in variants:
                r = run_variant(variant, data, files, cluster, Path(tmp), run)
                results.append(r)
                print(f"  run {run + 1} {variant:15} {r['wall']:7.2f}s  compute {r['compute']:6.2f}s  "
                      f"peak RSS {common.mb(r['peak_rss']):>8}  {r['keys']} keys  {r['sha256'][:12]}",
                      flush=True)
    report(results, size, title)
    print(f"raw results: {common.save('weather', {'data': str(data), 'bytes': size, 'runs': results})}")


if __name__ == "__main__":
    main()
