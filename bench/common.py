"""Helpers shared by the benchmark scripts: dependency checks, process-tree RSS
sampling, a warm local IPDC cluster, running a variant as its own process tree,
canonical hashes of job results and tables.

Each script imports this module by path (``bench/`` is not a package), so the
scripts run from a clean clone as ``python bench/<name>.py``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
INSTALL_HINT = f"pip install -e '{REPO}[bench]'"


def require(*modules: str) -> None:
    """Exit with one clear message when a bench-only dependency is missing.

    The scripts must run from a clean clone; a bare ImportError deep inside a
    variant would hide which extra to install.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"missing benchmark dependencies: {', '.join(missing)}\ninstall them with: {INSTALL_HINT}")


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: with 100 samples p99 is the 99th smallest, not an interpolation."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5 - 1e-9)))
    return ordered[rank - 1]


# -- memory -------------------------------------------------------------------------
class TreeRSS:
    """Peak summed RSS of some processes and all their descendants, sampled in a thread.

    Sampling (every ``interval`` seconds) can miss a short spike; at 20 ms it sees
    every phase of the jobs measured here, which last seconds.
    """

    def __init__(self, roots: Iterable[int], interval: float = 0.02) -> None:
        import psutil

        self._psutil = psutil
        self.roots = list(roots)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def add(self, pid: int) -> None:
        self.roots.append(pid)

    def sample(self) -> int:
        ps = self._psutil
        seen: dict[int, int] = {}
        for pid in list(self.roots):
            try:
                root = ps.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    if proc.pid not in seen:
                        seen[proc.pid] = proc.memory_info().rss
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue
        return sum(seen.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- IPDC ---------------------------------------------------------------------------
@contextmanager
def warm_cluster(n: int, nice: int | None = None, **cluster_args: Any) -> Iterator[Any]:
    """A started LocalCluster of ``n`` nodes whose agents have all announced themselves
    (runners at ``nice`` when given, else at ``sandbox.nice``'s default).

    Yields the cluster; its nodes' services are children of this process, so
    :class:`TreeRSS` over our children sees them. Its agents (and so their runners)
    run this checkout's ``ipdc``, as the CLI the scripts start does, not whichever
    one is installed.
    """
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    from ipdc.node.cluster import LocalCluster
    from ipdc.submit.client import SwarmClient

    if nice is not None:
        cluster_args["settings"] = {"sandbox": {"nice": nice}}
    with LocalCluster(n, **cluster_args) as cluster:
        with SwarmClient(cluster.nodes[0].config, cluster.nodes[0].signer).connect() as client:
            deadline = time.monotonic() + 60
            while len(client.peers.live()) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(client.peers.live())} of {n} agents announced themselves")
                time.sleep(0.05)
        yield cluster


def descendants(roots: Iterable[int]) -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of ``roots``."""
    import psutil

    found = []
    for pid in roots:
        for proc in psutil.Process(pid).children(recursive=True):
            try:
                found.append((proc.pid, " ".join(proc.cmdline())))
            except psutil.NoSuchProcess:
                continue
    return found


def cluster_pids(cluster: Any) -> list[int]:
    """The service pids (mosquitto, kubo, agent) of every node of a LocalCluster."""
    return [pid for node in cluster.nodes for service in node.services.values()
            if (pid := service.pid()) is not None]


# -- job output -------------------------------------------------------------------------
def _field(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def canonical_sha256(result: Mapping[Any, Any]) -> str:
    """One hash for a job's result, whatever produced it: ``key\\tvalue\\n`` lines sorted
    by key, UTF-8 with surrogate escapes; strings as they are, anything else as JSON with
    sorted dict keys (a tuple key and the list IPDC's output holds are the same line).
    For a word count: ``word\\tcount`` lines sorted by word (code point order)."""
    lines = sorted((_field(key), _field(value)) for key, value in result.items())
    digest = hashlib.sha256()
    for key, value in lines:
        digest.update(f"{key}\t{value}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def read_ipdc_output(output: Path, parse_key: Callable[[str], Any] = str,
                     parse_value: Callable[[str], Any] = int) -> dict[Any, Any]:
    """Parse an ``ipdc mr`` output directory (part-NNNNN: ``key<TAB>value`` lines; for a
    word count the word as it is and its count; JSON fields for other jobs)."""
    result: dict[Any, Any] = {}
    for part in sorted(output.glob("part-*")):
        for line in part.read_bytes().decode("utf-8", "surrogateescape").split("\n"):
            if line:
                key, _, value = line.rpartition("\t")
                result[_hashable(parse_key(key))] = parse_value(value)
    return result


def _hashable(key: Any) -> Any:
    return tuple(map(_hashable, key)) if isinstance(key, list) else key


# -- running a variant --------------------------------------------------------------------
class Run(NamedTuple):
    wall: float
    peak_rss: int
    cpu: float
    stdout: str


def tree_cpu(roots: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by ``roots``, their descendants and every
    process they have reaped: a runner that ended is in its fork server's children."""
    import psutil

    seen: set[int] = set()
    total = 0.0
    for pid in roots:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def run_tree(argv: list[str], env: Mapping[str, str], roots: Iterable[int] = ()) -> Run:
    """Run one command as its own process tree; its wall time, the peak RSS of the tree
    (plus ``roots``' trees, e.g. a warm cluster's services), the CPU seconds all of them
    used meanwhile, and its stdout. A failure raises with the end of its stderr.

    CPU seconds are the work done, whoever else shares the machine; wall time on a busy
    machine also holds the time spent waiting for a core (and IPDC's runners wait more:
    they run at nice 19)."""
    roots = list(roots)
    cpu = tree_cpu(roots) + _children_cpu()
    t = time.perf_counter()
    with TreeRSS(roots) as rss:
        proc = subprocess.Popen(argv, env=dict(env), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        rss.add(proc.pid)
        out, err = proc.communicate()
    wall = time.perf_counter() - t
    cpu = tree_cpu(roots) + _children_cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed (exit {proc.returncode}):\n{err[-4000:]}")
    return Run(wall, rss.peak, cpu, out)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ipdc_mr_argv(corpus: Path, output: Path, *options: str) -> list[str]:
    """``ipdc mr --k 2`` as the benchmarks run it: a fresh CLI process, quiet, into ``output``,
    computed every time (``--no-cache``: run 2 would be answered from the swarm's cache)."""
    return [sys.executable, "-m", "ipdc.cli", "mr", str(corpus), "--k", "2", "-q", "--no-cache", "-o", str(output),
            *options]


# -- reporting ------------------------------------------------------------------------
def machine() -> str:
    """One line naming the machine, for the README's results table."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{model or platform.processor()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table on stdout: readable in a terminal and pasted as is into the README."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    sys.stdout.flush()


def save(name: str, data: Any) -> Path:
    """Raw figures as JSON under bench/results/ (gitignored), for later comparison."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=str) + "\n")
    return path


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def mb(n_bytes: float) -> str:
    """Decimal megabytes, as the corpus size (202 MB) and MB/s are quoted."""
    return f"{n_bytes / 1e6:.0f} MB"
