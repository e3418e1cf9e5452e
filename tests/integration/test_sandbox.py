"""User code that misbehaves, in real sandboxed runners against a real kubo.

Each test drives an :class:`~ipdc.agent.execute.Executor` (the agent's own path: fetch
and check the input, hand it to a runner in its sandbox, take the outputs back, add
them to kubo) with small limits, then checks that the failure names the limit and its
setting, that no process of the runner is left (a scan of every process on the
machine, and its cgroup), and that the same pool still runs a normal WordCount with
exact counts. The sandbox API itself (:func:`ipdc.spawn.Sandbox.start` with extra
read-only dirs, inherited sockets and environment, as a TF server uses it) is tested
at the end.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ipdc.agent.execute import Executor
from ipdc.agent.sandbox import Runner, runner_spec
from ipdc.config import SandboxSection
from ipdc.errors import IPDCError, KuboError, TaskFailed
from ipdc.kubo import KuboClient
from ipdc.node.cluster import LocalCluster
from ipdc.spawn import Sandbox, SandboxSpec, pid_alive, wait_for
from ipdc.wire import fdmsg
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.manifest import JobManifest
from tests.helpers import REPO, bad_map, processes_with, reference_counts

WORDCOUNT_MAP = (REPO / "ipdc" / "jobs" / "mapreduce" / "Map.py").read_text()
WORDCOUNT_REDUCE = (REPO / "ipdc" / "jobs" / "mapreduce" / "Reduce.py").read_text()
TEXT = "the cat sat on the mat\r\ncafé \udcff\udcfe naïve the\n".encode("utf-8", "surrogateescape") * 40

INFINITE_LOOP = bad_map("infinite loop", chunk=True)
TEN_GB = bad_map("10 GB", chunk=True)
FORK_BOMB = bad_map("fork bomb", chunk=True)
# A child (tagged TAG, so a scan of the machine finds it) outlives the runner, which exits.
EXIT_LEAVING_A_CHILD = """import os

def map_chunk(text):
    if os.fork() == 0:
        os.execv("/usr/bin/sleep", ["TAG", "600"])
    os._exit(5)
"""
# setsid + double fork: a daemon (tagged TAG) that leaves the runner's session; then the task hangs.
ESCAPE = """import os, time

def map_chunk(text):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", ["TAG", "600"])
        os._exit(0)
    while True:
        time.sleep(1)
"""
ENVIRONMENT = """import json, os

def map_chunk(text):
    raise RuntimeError("ENV=" + json.dumps(dict(os.environ)))
"""
# Past the memory cgroup without touching RLIMIT_AS: files in /job are memory too.
TMPFS_HOG = """def map_chunk(text):
    with open("/job/hog", "wb") as f:
        for _ in range(512):
            f.write(b"x" * (1 << 20))
    return []
"""
# Replies forged on the runner's own channel (fd 3): over the cap, and an unsealed output.
OVERSIZED_REPLY = """import os, socket

def map_chunk(text):
    channel = socket.socket(fileno=os.dup(3))
    try:
        channel.send(b"x" * (100 << 20))
    except OSError as exc:
        print("a 100 MB message:", exc.strerror, flush=True)
    channel.send(b"{" + b" " * (150 << 10) + b"}")
    return []
"""
UNSEALED_OUTPUT = """import json, os, socket

def map_chunk(text):
    out = os.memfd_create("forged")
    os.write(out, b"x")
    forged = json.dumps({"ok": True, "sizes": [1, 0]}).encode()
    socket.send_fds(socket.socket(fileno=os.dup(3)), [forged], [out])
    return []
"""


def manifest(partitions: int = 2) -> JobManifest:
    return JobManifest(job_id=JobId.new(), owner=NodeName("n-test"), code={"Map.py": Cid(EMPTY), "Reduce.py":
                       Cid(EMPTY)}, chunks=[], partitions=partitions, workers=[NodeName("n-test")])


EMPTY = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


class Job:
    """One job as the agent holds it: a manifest, and its code in a work dir."""

    def __init__(self, base: Path, map_source: str, partitions: int = 2) -> None:
        self.manifest = manifest(partitions)
        self.id = self.manifest.job_id
        self.dir = base / "work" / self.id
        self.dir.mkdir(parents=True)
        (self.dir / "Map.py").write_text(map_source)
        (self.dir / "Reduce.py").write_text(WORDCOUNT_REDUCE)


MakeExecutor = Callable[..., Executor]


@pytest.fixture(scope="module")
def kubo(swarm: LocalCluster) -> Iterator[KuboClient]:
    with swarm.nodes[0].kubo() as client:
        yield client


@pytest.fixture
def make_executor(tmp_path: Path, kubo: KuboClient) -> Iterator[MakeExecutor]:
    made: list[tuple[Sandbox, Executor]] = []

    def make(**limits: object) -> Executor:
        settings = SandboxSection(**{"task_timeout": 60.0, **limits})  # type: ignore[arg-type]
        sandbox = Sandbox(tmp_path / "logs")
        executor = Executor(settings, sandbox, kubo, 1)
        made.append((sandbox, executor))
        return executor

    yield make
    for sandbox, executor in made:
        executor.close()
        zygote = sandbox._zygote.proc if sandbox._zygote else None
        sandbox.close()
        assert zygote is None or zygote.poll() is not None
        assert sandbox.cgroups is None or not any(d.exists() for d in sandbox.cgroups.dirs.values())


def wordcount(executor: Executor, kubo: KuboClient, base: Path, inputs: tuple[bytes, ...] = (TEXT,),
              partitions: int = 2) -> Counter[bytes]:
    """A normal WordCount through ``executor``: a map per input, then one reduce per partition."""
    job = Job(base, WORDCOUNT_MAP, partitions)
    counts: Counter[bytes] = Counter()
    try:
        maps = [executor.run_map(job.id, job.manifest, job.dir, kubo.add_bytes(data))[0] for data in inputs]
        for p in range(partitions):
            (cid,), _, _ = executor.run_reduce(job.id, job.manifest, job.dir, tuple(m[p] for m in maps))
            for line in kubo.cat(cid).splitlines():
                key, _, value = line.rpartition(b"\t")
                counts[key] = int(value)
    finally:
        executor.drop(job.id)
    return counts


def failing_map(executor: Executor, kubo: KuboClient, base: Path, source: str,
                cid: str | None = None) -> tuple[IPDCError, Runner]:
    """Run one map task of ``source`` as the agent does; it must fail. Also the runner it ran in."""
    job = Job(base, source)
    runner = executor.pool.acquire(job.id, {"Map.py": source.encode()}, 2)
    executor.pool.release(runner)
    try:
        with pytest.raises((TaskFailed, KuboError)) as failed:
            executor.run_map(job.id, job.manifest, job.dir, Cid(cid or kubo.add_bytes(TEXT)))
    finally:
        executor.drop(job.id)
    return failed.value, runner


def assert_gone(runner: Runner) -> None:
    """No process of the runner is left: not bubblewrap, not its cgroup."""
    assert runner.process.exited.wait(10) and not pid_alive(runner.pid)
    if runner.process.cgroup is not None:
        assert not any(d.exists() for d in runner.process.cgroup.dirs.values())


def in_background(task: Callable[[], object]) -> tuple[threading.Thread, list[Exception]]:
    """Run a task in a thread, as the agent's task pool does; its error lands in the list."""
    errors: list[Exception] = []

    def run() -> None:
        try:
            task()
        except Exception as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    return worker, errors


def test_a_normal_job_gives_exact_counts(make_executor: MakeExecutor, kubo: KuboClient,
                                         tmp_path: Path) -> None:
    executor = make_executor()
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_each_job_gets_its_own_runner(make_executor: MakeExecutor, tmp_path: Path) -> None:
    pool = make_executor().pool
    code = {"Map.py": WORDCOUNT_MAP.encode()}
    first = pool.acquire("a", code, 2)
    pool.release(first)
    other = pool.acquire("b", code, 2)
    again = pool.acquire("a", code, 2)
    assert again is first and other.pid != first.pid  # tasks of a job share; jobs do not
    assert first.process.uid != other.process.uid or os.geteuid() != 0  # as root, a uid each
    for runner in (other, again):
        pool.release(runner)
    pool.drop("a")
    pool.drop("b")
    for runner in (first, other):
        assert_gone(runner)


def test_an_infinite_loop_is_killed_by_the_wall_clock(make_executor: MakeExecutor, kubo: KuboClient,
                                                     tmp_path: Path) -> None:
    executor = make_executor(task_timeout=3.0)
    failed, runner = failing_map(executor, kubo, tmp_path, INFINITE_LOOP)
    assert "the map task was killed after 3 s wall-clock (sandbox.task_timeout)" in str(failed)
    assert_gone(runner)
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_an_infinite_loop_is_stopped_by_the_cpu_limit(make_executor: MakeExecutor, kubo: KuboClient,
                                                     tmp_path: Path) -> None:
    executor = make_executor(cpu_seconds=1, nice=0)  # at nice 19 a busy machine may take long to give 1 s
    failed, runner = failing_map(executor, kubo, tmp_path, INFINITE_LOOP)
    assert "the map task exceeded the CPU-time limit of 1 s (sandbox.cpu_seconds)" in str(failed)
    assert_gone(runner)
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_a_10_gb_allocation_fails_under_the_memory_limit(make_executor: MakeExecutor, kubo: KuboClient,
                                                        tmp_path: Path) -> None:
    executor = make_executor(memory_mb=1024)
    failed, runner = failing_map(executor, kubo, tmp_path, TEN_GB)
    assert "the map task exceeded the memory limit of 1024 MB (sandbox.memory_mb)" in str(failed)
    assert isinstance(failed, TaskFailed) and "MemoryError" in failed.remote_traceback
    assert_gone(runner)  # a runner that hit a limit is not reused
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_files_past_the_memory_cgroup_get_the_runner_killed(make_executor: MakeExecutor, kubo: KuboClient,
                                                           tmp_path: Path) -> None:
    """/job is a tmpfs: its files are memory, charged to the sandbox's memory cgroup."""
    executor = make_executor(memory_mb=256, disk_mb=1024)
    if executor.pool.sandbox.cgroups is None or "memory" not in executor.pool.sandbox.cgroups.dirs:
        pytest.fail("no memory cgroup here: the runner would fill the machine's memory")
    failed, runner = failing_map(executor, kubo, tmp_path, TMPFS_HOG)
    assert "was killed by the kernel at the memory limit of 256 MB (sandbox.memory_mb" in str(failed)
    assert_gone(runner)
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_a_disk_quota_stops_a_writer(make_executor: MakeExecutor, kubo: KuboClient, tmp_path: Path) -> None:
    executor = make_executor(disk_mb=64)
    failed, _ = failing_map(executor, kubo, tmp_path, TMPFS_HOG)
    assert "filled its disk quota of 64 MB (sandbox.disk_mb)" in str(failed)
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_a_fork_bomb_is_contained(make_executor: MakeExecutor, kubo: KuboClient, tmp_path: Path) -> None:
    executor = make_executor(task_timeout=3.0, max_pids=16)
    failed, runner = failing_map(executor, kubo, tmp_path, FORK_BOMB)
    assert "killed after 3 s wall-clock (sandbox.task_timeout)" in str(failed)
    if executor.pool.sandbox.cgroups is not None:
        assert "limit of 16 processes (sandbox.max_pids)" in str(failed)
    assert_gone(runner)
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_drop_kills_a_daemon_that_left_the_runners_session(make_executor: MakeExecutor, kubo: KuboClient,
                                                           tmp_path: Path) -> None:
    executor = make_executor()
    tag = f"ipdc-escape-{secrets.token_hex(4)}"
    job = Job(tmp_path, ESCAPE.replace("TAG", tag))
    chunk = kubo.add_bytes(TEXT)
    worker, errors = in_background(lambda: executor.run_map(job.id, job.manifest, job.dir, chunk))
    assert wait_for(lambda: processes_with(tag) != [], 30)
    daemon = processes_with(tag)[0]
    assert os.getsid(daemon) != os.getsid(os.getpid())
    executor.drop(job.id)  # the job's CleanUp
    worker.join(timeout=30)
    assert errors and processes_with(tag) == []
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_a_runner_that_exits_takes_its_children_along(make_executor: MakeExecutor, kubo: KuboClient,
                                                      tmp_path: Path) -> None:
    executor = make_executor(task_timeout=60.0)
    tag = f"ipdc-child-{secrets.token_hex(4)}"
    started = time.monotonic()
    failed, runner = failing_map(executor, kubo, tmp_path, EXIT_LEAVING_A_CHILD.replace("TAG", tag))
    assert time.monotonic() - started < 30  # well before the task timeout
    assert "the runner process of the map task ended (exit code 5)" in str(failed)
    assert_gone(runner)
    assert processes_with(tag) == []
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_the_runner_environment_holds_no_secrets(make_executor: MakeExecutor, kubo: KuboClient,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPDC_BROKER_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter3-secret")
    executor = make_executor()
    failed, _ = failing_map(executor, kubo, tmp_path, ENVIRONMENT)
    seen = json.loads(str(failed).split("ENV=", 1)[1])
    assert set(seen) <= {"PATH", "HOME", "TMPDIR", "LANG", "LD_LIBRARY_PATH", "PWD"}
    assert "secret" not in str(failed)
    zygote = executor.pool.sandbox._zygote
    assert zygote is not None and b"secret" not in Path(f"/proc/{zygote.proc.pid}/environ").read_bytes()
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_an_oversized_reply_gets_the_runner_killed(make_executor: MakeExecutor, kubo: KuboClient,
                                                   tmp_path: Path) -> None:
    """100 MB cannot even be sent as one message (EMSGSIZE); 150 KB arrives cut at the cap."""
    executor = make_executor()
    failed, runner = failing_map(executor, kubo, tmp_path, OVERSIZED_REPLY)
    assert ("the runner process sent a message of more than 65536 bytes (the cap); it was killed"
            in str(failed))
    assert_gone(runner)
    assert "a 100 MB message: Message too long" in (tmp_path / "logs" / "runners.log").read_text()
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_an_unsealed_output_is_refused(make_executor: MakeExecutor, kubo: KuboClient, tmp_path: Path) -> None:
    executor = make_executor()
    failed, runner = failing_map(executor, kubo, tmp_path, UNSEALED_OUTPUT)
    assert "the runner's output was refused: an output memfd that is not sealed" in str(failed)
    assert_gone(runner)
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def _absent_cid(codec: int) -> str:
    """A CIDv1 (raw 0x55: one block; dag-pb 0x70: a file of many) that no node of the swarm has."""
    digest = bytes([0x01, codec, 0x12, 0x20]) + hashlib.sha256(uuid.uuid4().bytes).digest()
    return "b" + base64.b32encode(digest).decode().lower().rstrip("=")


@pytest.mark.parametrize("codec", [0x55, 0x70])
def test_a_fetch_that_stalls_fails_the_task(make_executor: MakeExecutor, kubo: KuboClient, tmp_path: Path,
                                            codec: int) -> None:
    executor = make_executor(fetch_stall=1.5)
    missing = _absent_cid(codec)
    failed, _ = failing_map(executor, kubo, tmp_path, WORDCOUNT_MAP, cid=missing)
    assert str(failed) == (f"could not fetch {missing} from the swarm: no data for 1.5 s "
                           "(the peer holding it may have left)")
    job = Job(tmp_path, WORDCOUNT_MAP)
    good = executor.run_map(job.id, job.manifest, job.dir, kubo.add_bytes(TEXT))[0][0]
    with pytest.raises(KuboError, match=f"could not fetch {missing} from the swarm"):
        executor.run_reduce(job.id, job.manifest, job.dir, (good, Cid(missing)))
    executor.drop(job.id)
    assert wordcount(executor, kubo, tmp_path) == reference_counts(TEXT)


def test_a_big_input_is_fetched_and_counted(make_executor: MakeExecutor, kubo: KuboClient,
                                            tmp_path: Path) -> None:
    """Inputs of several blocks (256 KiB each) are fetched with refs -r, then cat, then checked."""
    executor = make_executor()
    inputs = [TEXT * 400, TEXT * 250 + b"more words here\n"]  # 700 and 440 kB: several blocks each
    counts = wordcount(executor, kubo, tmp_path, tuple(inputs), partitions=3)
    assert counts == reference_counts(b"".join(inputs))


class _LyingKubo(http.server.BaseHTTPRequestHandler):
    """A kubo API that answers every ``cat`` with bytes other than the CID's."""

    def do_POST(self) -> None:
        body = b"not what you asked for\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_bytes_that_do_not_match_their_cid_are_refused(kubo: KuboClient) -> None:
    """What the agent fetches is checked against the CID: a compromised kubo (here, a server
    that lies) cannot feed a task other bytes."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LyingKubo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cid = kubo.add_bytes(TEXT)
        with KuboClient(f"http://127.0.0.1:{server.server_address[1]}") as liar:
            with pytest.raises(KuboError, match=f"kubo returned 23 bytes for {cid} that are not what"):
                liar.fetch_checked(cid, stall=5)
            # the same check when the bytes go straight into a runner's memfd
            with pytest.raises(KuboError, match=f"kubo returned 23 bytes for {cid} that are not what"):
                liar.fetch_checked_into(cid, fdmsg.memfd("t"), stall=5, cap=1 << 20)
        assert kubo.fetch_checked(cid, stall=5) == TEXT
        big = TEXT * 400  # several blocks: a dag-pb root over raw leaves
        big_cid = kubo.add_bytes(big)
        fd = fdmsg.memfd("t")
        assert kubo.fetch_checked_into(big_cid, fd, stall=5, cap=1 << 20) == len(big)
        fdmsg.seal(fd)
        assert fdmsg.read_sealed(fd, 1 << 20) == big
        with pytest.raises(KuboError, match="is more than 0 MB"):
            kubo.fetch_checked_into(big_cid, fdmsg.memfd("t"), stall=5, cap=1000)
    finally:
        server.shutdown()


def test_close_leaves_no_process(make_executor: MakeExecutor, kubo: KuboClient, tmp_path: Path) -> None:
    """The agent's shutdown: a busy runner, a spare and the zygote all end."""
    executor = make_executor()
    tag = f"ipdc-close-{secrets.token_hex(4)}"
    job = Job(tmp_path, ESCAPE.replace("TAG", tag))
    chunk = kubo.add_bytes(TEXT)
    worker, errors = in_background(lambda: executor.run_map(job.id, job.manifest, job.dir, chunk))
    pool = executor.pool
    assert wait_for(lambda: processes_with(tag) != [] and len(pool._spares) == 1, 30)
    spares = list(pool._spares)
    sandbox = pool.sandbox
    assert sandbox._zygote is not None
    zygote = sandbox._zygote.proc
    executor.close()
    sandbox.close()
    worker.join(timeout=30)
    assert errors and processes_with(tag) == [] and zygote.poll() is not None
    for spare in spares:
        assert_gone(spare)


AGENT = """
import json, sys
from pathlib import Path
from ipdc.agent.sandbox import RunnerPool
from ipdc.config import SandboxSection
from ipdc.spawn import Sandbox, wait_for
sandbox = Sandbox(Path(sys.argv[1]))
pool = RunnerPool(SandboxSection(), sandbox, 1)
assert wait_for(lambda: pool._spares and pool._spares[0].process.pid1() is not None, 30)
spare = pool._spares[0].process
pools = [str(d) for d in sandbox.cgroups.dirs.values()] if sandbox.cgroups else []
seen = {"zygote": sandbox._zygote.proc.pid, "spare": spare.pid, "pid1": spare.pid1(), "pools": pools}
print(json.dumps(seen), flush=True)
sys.stdin.read()
"""


def test_sandboxes_die_with_their_agent(tmp_path: Path) -> None:
    """An agent killed with SIGKILL leaves no sandbox behind; the next one removes its cgroups."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert agent.stdout is not None
        seen = json.loads(agent.stdout.readline())
    finally:
        agent.kill()
        agent.wait()
    assert wait_for(lambda: not any(pid_alive(seen[k]) for k in ("zygote", "spare", "pid1")), 30)
    for pool in map(Path, seen["pools"]):
        assert all(not (group / "cgroup.procs").read_text().split() for group in pool.glob("runner-*"))
    Sandbox(tmp_path).close()  # a new agent's sandbox clears the dead one's pools
    assert not any(Path(p).exists() for p in seen["pools"])


PROBE = """import os, socket

def map_chunk(text):
    listener = socket.socket(fileno=4)
    conn, _ = listener.accept()
    conn.sendall(("|".join([os.environ["IPDC_PROBE"], ",".join(sorted(os.listdir(DIR)))])).encode())
    conn.close()
    return []
"""


def test_a_sandbox_gets_its_extra_dirs_sockets_and_environment(tmp_path: Path) -> None:
    """What a TF server asks of the sandbox: a read-only dir of the host, a listening socket
    of the host (it serves connections from outside its empty network namespace), an
    environment variable, and its own limits."""
    shared = Path(tempfile.mkdtemp(prefix="ipdc-shared-"))  # where the sandbox's uid can reach it
    (shared / "peer.sock").write_text("")
    shared.chmod(0o755)
    listener = socket.create_server(("127.0.0.1", 0))
    base = runner_spec(SandboxSection())
    spec = SandboxSpec(module=base.module, name="probe", args=base.args, limits=base.limits,
                       ro_dirs=(str(shared),), fds=(listener.fileno(),), env=(("IPDC_PROBE", "hello"),))
    sandbox = Sandbox(tmp_path / "logs")
    try:
        process = sandbox.start(spec)
        got = process.recv(60)
        assert got is not None and got[0]["ready"]
        code = fdmsg.sealed_memfd([PROBE.replace("DIR", repr(str(shared))).encode()])
        process.send({"op": "load", "job": "probe", "partitions": 1, "files": ["Map.py"]}, [code])
        os.close(code)
        got = process.recv(60)
        assert got is not None and got[0]["ok"]
        data = fdmsg.sealed_memfd([b""])
        process.send({"op": "map"}, [data])
        os.close(data)
        with socket.create_connection(listener.getsockname(), timeout=60) as conn:
            assert conn.recv(1024) == b"hello|peer.sock"
        got = process.recv(60)
        assert got is not None and got[0]["ok"]
        fdmsg.close_all(got[1])
        process.kill()
        assert process.exited.is_set() and not pid_alive(process.pid)
    finally:
        sandbox.close()
        listener.close()
        shutil.rmtree(shared)
