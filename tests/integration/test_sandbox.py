"""Issue 6: user code that misbehaves, in real runner processes against a real kubo.

Each test drives a RunnerPool as the agent does (acquire, call, release, drop) with
small limits, then checks that the failure names the limit and its setting, that no
process of the runner is left (process table and cgroup), and that the same pool
still runs a normal WordCount with exact counts. The fork-bomb and escape tests run
only where a pids cgroup is verified to hold the runner: without one they would
take the machine down.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ipdc.agent.sandbox import SAFE_ENV, RunnerPool, RunnerProcess
from ipdc.config import SandboxSection
from ipdc.errors import TaskFailed
from ipdc.kubo import KuboClient
from ipdc.node.cluster import LocalCluster
from ipdc.spawn import pid_alive, wait_for
from tests.helpers import REPO, bad_map, reference_counts

WORDCOUNT_MAP = (REPO / "ipdc" / "jobs" / "mapreduce" / "Map.py").read_text()
WORDCOUNT_REDUCE = (REPO / "ipdc" / "jobs" / "mapreduce" / "Reduce.py").read_text()
TEXT = "the cat sat on the mat\r\ncafé \udcff\udcfe naïve the\n".encode("utf-8", "surrogateescape") * 40

INFINITE_LOOP = bad_map("infinite loop", chunk=True)
TEN_GB = bad_map("10 GB", chunk=True)
FORK_BOMB = bad_map("fork bomb", chunk=True)
# The child holds the runner's socket open after the runner has gone.
EXIT_LEAVING_A_CHILD = """import os, time

def map_chunk(text):
    child = os.fork()
    if child == 0:
        while True:
            time.sleep(1)
    with open(PID_FILE, "w") as f:
        f.write(str(child))
    os._exit(5)
"""
ENVIRONMENT = """import json, os

def map_chunk(text):
    raise RuntimeError("ENV=" + json.dumps(dict(os.environ)))
"""
# A grandchild that leaves the runner's session and process group, then the task hangs.
ESCAPE = """import os, subprocess, time

def map_chunk(text):
    subprocess.Popen(["sleep", "600"], start_new_session=True)
    with open("escaped.pid", "w") as f:
        f.write(str(subprocess.Popen(["sleep", "600"], start_new_session=True).pid))
    while True:
        time.sleep(1)
"""


MakePool = Callable[..., RunnerPool]


@pytest.fixture(scope="module")
def kubo(swarm: LocalCluster) -> Iterator[KuboClient]:
    with KuboClient(swarm.nodes[0].config.kubo_api_url) as client:
        yield client


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[MakePool]:
    pools: list[RunnerPool] = []

    def make(**limits: object) -> RunnerPool:
        settings = SandboxSection(**{"task_timeout": 60.0, **limits})  # type: ignore[arg-type]
        pool = RunnerPool(settings, tmp_path / "logs", 1)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
        assert not pool._zygote.alive()
        if pool.cgroups is not None:
            assert not pool.cgroups.root.exists()


class Job:
    """One job's code directory and its bind request, as the agent makes them."""

    def __init__(self, base: Path, kubo: KuboClient, map_source: str, partitions: int = 2) -> None:
        self.id = uuid.uuid4().hex
        self.dir = base / "home" / "work" / self.id  # a node's layout: the runner hides the rest of "home"
        self.dir.mkdir(parents=True)
        (self.dir / "Map.py").write_text(map_source)
        (self.dir / "Reduce.py").write_text(WORDCOUNT_REDUCE)
        self.bind = {"dir": str(self.dir), "kubo": kubo.api_url, "partitions": partitions,
                     "map": str(self.dir / "Map.py"), "reduce": str(self.dir / "Reduce.py")}


def wordcount(pool: RunnerPool, kubo: KuboClient, base: Path, inputs: tuple[bytes, ...] = (TEXT,),
              partitions: int = 2) -> Counter[bytes]:
    """A normal WordCount through ``pool``: a map per input, then one reduce per partition."""
    job = Job(base, kubo, WORDCOUNT_MAP, partitions=partitions)
    runner = pool.acquire(job.id, job.bind)
    counts: Counter[bytes] = Counter()
    try:
        maps = [runner.call({"op": "map", "cid": kubo.add_bytes(data)}, timeout=60)["cids"] for data in inputs]
        for p in range(partitions):
            (cid,) = runner.call({"op": "reduce", "cids": [m[p] for m in maps]}, timeout=60)["cids"]
            for line in kubo.cat(cid).splitlines():
                key, _, value = line.rpartition(b"\t")
                counts[key] = int(value)
    finally:
        pool.release(runner)
        pool.drop(job.id)
    return counts


def failing_map(pool: RunnerPool, kubo: KuboClient, base: Path, source: str,
                cid: str | None = None) -> tuple[TaskFailed, RunnerProcess]:
    """Run one map task of ``source`` as the agent does; it must fail."""
    job = Job(base, kubo, source)
    runner = pool.acquire(job.id, job.bind)
    try:
        with pytest.raises(TaskFailed) as failed:
            runner.call({"op": "map", "cid": cid or kubo.add_bytes(TEXT)}, timeout=pool.settings.task_timeout)
    finally:
        pool.release(runner)
        pool.drop(job.id)
    return failed.value, runner


def assert_gone(runner: RunnerProcess) -> None:
    """No process of the runner is left: not the runner, and not its cgroup."""
    assert runner.pid is not None and not pid_alive(runner.pid)
    if runner.group is not None:
        assert not runner.group.exists()


def contained(pool: RunnerPool, kubo: KuboClient, base: Path) -> str:
    """Why fork bombs are not contained here, or "" once a runner is seen inside its pids cgroup."""
    if pool.cgroups is None:
        return "no writable pids cgroup: a fork bomb would not be contained"
    job = Job(base, kubo, WORDCOUNT_MAP)
    runner = pool.acquire(job.id, job.bind)
    try:
        assert runner.group is not None and runner.pid is not None
        members = (runner.group / "cgroup.procs").read_text().split()
        limit = (runner.group / "pids.max").read_text().strip()
    finally:
        pool.release(runner)
        pool.drop(job.id)
    if members != [str(runner.pid)] or limit != str(pool.settings.max_pids):
        return f"runner {runner.pid} is not alone in a cgroup with pids.max (members {members}, max {limit})"
    return ""



def map_in_background(runner: RunnerProcess, kubo: KuboClient) -> tuple[threading.Thread, list[TaskFailed]]:
    """Start a map call in a thread, as the agent's task pool does; its error lands in the list."""
    errors: list[TaskFailed] = []

    def task() -> None:
        try:
            runner.call({"op": "map", "cid": kubo.add_bytes(TEXT)}, timeout=60)
        except TaskFailed as exc:
            errors.append(exc)

    worker = threading.Thread(target=task)
    worker.start()
    return worker, errors

def test_a_normal_job_gives_exact_counts(make_pool: MakePool, kubo: KuboClient, tmp_path: Path) -> None:
    pool = make_pool()
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def test_each_job_gets_its_own_runner_process(make_pool: MakePool, kubo: KuboClient, tmp_path: Path) -> None:
    pool = make_pool()
    a, b = Job(tmp_path, kubo, WORDCOUNT_MAP), Job(tmp_path, kubo, WORDCOUNT_MAP)
    first = pool.acquire(a.id, a.bind)
    pool.release(first)
    other = pool.acquire(b.id, b.bind)
    again = pool.acquire(a.id, a.bind)
    assert again is first and other.pid not in (None, first.pid)  # tasks of a job share; jobs do not
    for runner in (other, again):
        pool.release(runner)
    pool.drop(a.id)
    pool.drop(b.id)
    for runner in (first, other):
        assert_gone(runner)


def test_an_infinite_loop_is_killed_by_the_wall_clock(make_pool: MakePool, kubo: KuboClient, tmp_path: Path) -> None:
    pool = make_pool(task_timeout=3.0)
    failed, runner = failing_map(pool, kubo, tmp_path, INFINITE_LOOP)
    assert "the map task was killed after 3 s wall-clock (sandbox.task_timeout)" in str(failed)
    assert_gone(runner)
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def test_an_infinite_loop_is_stopped_by_the_cpu_limit(make_pool: MakePool, kubo: KuboClient, tmp_path: Path) -> None:
    pool = make_pool(cpu_seconds=1, nice=0)  # at nice 19 a busy machine may take long to give 1 s of CPU
    failed, runner = failing_map(pool, kubo, tmp_path, INFINITE_LOOP)
    assert "the map task exceeded the CPU-time limit of 1 s (sandbox.cpu_seconds)" in str(failed)
    assert_gone(runner)
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def test_a_10_gb_allocation_fails_under_the_memory_limit(make_pool: MakePool, kubo: KuboClient, tmp_path: Path) -> None:
    pool = make_pool(memory_mb=1024)
    failed, runner = failing_map(pool, kubo, tmp_path, TEN_GB)
    assert "the map task exceeded the memory limit of 1024 MB (sandbox.memory_mb)" in str(failed)
    assert "MemoryError" in failed.remote_traceback
    assert_gone(runner)  # a runner that hit a limit is not reused
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def test_a_fork_bomb_is_contained_by_the_pids_cgroup(make_pool: MakePool, kubo: KuboClient, tmp_path: Path) -> None:
    pool = make_pool(task_timeout=3.0, max_pids=16)
    reason = contained(pool, kubo, tmp_path)
    if reason:
        pytest.fail(f"the fork bomb is not run: {reason}")
    failed, runner = failing_map(pool, kubo, tmp_path, FORK_BOMB)
    assert "killed after 3 s wall-clock (sandbox.task_timeout)" in str(failed)
    assert "limit of 16 processes (sandbox.max_pids)" in str(failed)
    assert_gone(runner)
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def test_drop_kills_processes_that_left_the_runners_session(make_pool: MakePool, kubo: KuboClient,
                                                           tmp_path: Path) -> None:
    pool = make_pool()
    reason = contained(pool, kubo, tmp_path)
    if reason:
        pytest.fail(f"the escaping user code is not run: {reason}")
    job = Job(tmp_path, kubo, ESCAPE)
    runner = pool.acquire(job.id, job.bind)
    worker, errors = map_in_background(runner, kubo)
    pid_file = job.dir / "escaped.pid"
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text() != "", 30)
    escaped = int(pid_file.read_text())
    assert pid_alive(escaped) and os.getsid(escaped) != os.getsid(runner.pid)  # type: ignore[arg-type]
    pool.drop(job.id)  # the job's CleanUp
    worker.join(timeout=30)
    assert errors and not pid_alive(escaped)
    assert_gone(runner)
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def test_a_runner_that_exits_takes_its_children_along(make_pool: MakePool, kubo: KuboClient,
                                                      tmp_path: Path) -> None:
    """A child of user code keeps the runner's socket open; the runner's end must still end the task."""
    pool = make_pool(task_timeout=60.0)
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    source = EXIT_LEAVING_A_CHILD.replace("PID_FILE", repr(str(pid_file)))
    failed, runner = failing_map(pool, kubo, tmp_path, source)
    assert time.monotonic() - started < 30  # well before the task timeout
    assert "the runner process of the map task ended (exit code 5)" in str(failed)
    assert_gone(runner)
    assert wait_for(lambda: not pid_alive(int(pid_file.read_text())), 10)
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def test_without_a_pids_cgroup_the_pool_warns_and_kills_by_process_group(
        make_pool: MakePool, kubo: KuboClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Where no pids hierarchy is writable (here: as if none were mounted)."""
    monkeypatch.setattr("ipdc.agent.sandbox.pids_hierarchy", lambda: None)
    pool = make_pool(task_timeout=3.0)
    assert pool.cgroups is None
    assert "fork bombs in user code are not contained" in caplog.text
    pid_file = tmp_path / "child.pid"
    failed, runner = failing_map(pool, kubo, tmp_path, EXIT_LEAVING_A_CHILD.replace("PID_FILE", repr(str(pid_file))))
    assert "ended (exit code 5)" in str(failed)
    assert wait_for(lambda: not pid_alive(int(pid_file.read_text())), 10)
    failed, runner = failing_map(pool, kubo, tmp_path, INFINITE_LOOP)
    assert "killed after 3 s wall-clock (sandbox.task_timeout)" in str(failed)
    assert_gone(runner)
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def test_the_runner_environment_holds_no_secrets(make_pool: MakePool, kubo: KuboClient, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPDC_BROKER_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter3-secret")
    pool = make_pool()
    failed, runner = failing_map(pool, kubo, tmp_path, ENVIRONMENT)
    seen = json.loads(str(failed).split("ENV=", 1)[1])
    assert set(seen) <= set(SAFE_ENV) | {"PYTHONPATH", "PYTHONUNBUFFERED"}
    assert "secret" not in str(failed)
    zygote = pool._zygote.proc.pid
    assert b"secret" not in Path(f"/proc/{zygote}/environ").read_bytes()
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def _absent_cid(codec: int) -> str:
    """A CIDv1 (raw 0x55: one block; dag-pb 0x70: a file of many) that no node of the swarm has."""
    digest = bytes([0x01, codec, 0x12, 0x20]) + hashlib.sha256(uuid.uuid4().bytes).digest()
    return "b" + base64.b32encode(digest).decode().lower().rstrip("=")


@pytest.mark.parametrize("codec", [0x55, 0x70])
def test_a_fetch_that_stalls_fails_the_task(make_pool: MakePool, kubo: KuboClient, tmp_path: Path,
                                            codec: int) -> None:
    pool = make_pool(fetch_stall=1.5)
    missing = _absent_cid(codec)
    failed, runner = failing_map(pool, kubo, tmp_path, WORDCOUNT_MAP, cid=missing)
    assert str(failed) == (f"could not fetch {missing} from the swarm: no data for 1.5 s "
                           "(the peer holding it may have left)")
    job = Job(tmp_path, kubo, WORDCOUNT_MAP)
    reducer = pool.acquire(job.id, job.bind)
    try:
        good = reducer.call({"op": "map", "cid": kubo.add_bytes(TEXT)}, timeout=60)["cids"][0]
        with pytest.raises(TaskFailed, match=f"could not fetch {missing} from the swarm"):
            reducer.call({"op": "reduce", "cids": [good, missing]}, timeout=60)
    finally:
        pool.release(reducer)
        pool.drop(job.id)
    assert wordcount(pool, kubo, tmp_path) == reference_counts(TEXT)


def test_a_big_input_is_fetched_and_counted(make_pool: MakePool, kubo: KuboClient, tmp_path: Path) -> None:
    """Inputs of several blocks (256 KiB each) are fetched with refs -r, then cat."""
    pool = make_pool()
    inputs = [TEXT * 400, TEXT * 250 + b"more words here\n"]  # 700 and 440 kB: several blocks each
    assert wordcount(pool, kubo, tmp_path, tuple(inputs), partitions=3) == reference_counts(b"".join(inputs))


def test_close_leaves_no_process(make_pool: MakePool, kubo: KuboClient, tmp_path: Path) -> None:
    """The agent's shutdown: a busy runner, a spare and the zygote all end."""
    pool = make_pool()
    job = Job(tmp_path, kubo, INFINITE_LOOP)
    runner = pool.acquire(job.id, job.bind)
    worker, errors = map_in_background(runner, kubo)
    assert wait_for(lambda: len(pool._spares) == 1 and pool._spares[0].pid is not None, 30)
    spares = list(pool._spares)
    zygote = pool._zygote.proc.pid
    pool.close()
    worker.join(timeout=30)
    assert errors
    for ended in (runner, *spares):
        assert_gone(ended)
    assert not pid_alive(zygote)


AGENT = """
import json, sys, time
from pathlib import Path
from ipdc.config import SandboxSection
from ipdc.agent.sandbox import RunnerPool
from ipdc.spawn import wait_for
pool = RunnerPool(SandboxSection(), Path(sys.argv[1]), 1)
assert wait_for(lambda: pool._spares and pool._spares[0].pid is not None, 30)
spare = pool._spares[0]
print(json.dumps({"zygote": pool._zygote.proc.pid, "spare": spare.pid,
                  "group": str(spare.group or ""), "pool": str(pool.cgroups.root if pool.cgroups else "")}), flush=True)
sys.stdin.read()
"""


def test_runners_die_with_their_agent(tmp_path: Path) -> None:
    """An agent killed with SIGKILL leaves no runner behind, and the next pool removes its cgroup."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert agent.stdout is not None
        seen = json.loads(agent.stdout.readline())
    finally:
        agent.kill()
        agent.wait()
    assert wait_for(lambda: not pid_alive(seen["zygote"]) and not pid_alive(seen["spare"]), 30)
    if seen["pool"]:
        assert not (Path(seen["group"]) / "cgroup.procs").read_text().split()
        RunnerPool(SandboxSection(), tmp_path, 0).close()  # a new agent's pool clears the dead one's
        assert not Path(seen["pool"]).exists()
