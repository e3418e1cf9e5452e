"""The Python API when things go wrong, on a three-node swarm of its own (a test kills an
agent): cancel, a task that kills its runner every time, a worker killed mid-task."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.api import Swarm
from ipdc.errors import TaskFailed
from ipdc.node.cluster import LocalCluster
from ipdc.spawn import wait_for
from tests.helpers import run_cli

LEASE = 6.0


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # a short lease, so that a silent session's runners and pins are seen to go
    with LocalCluster(3, base=tmp_path_factory.mktemp("api-failures"),
                      settings={"agent": {"job_lease": LEASE}}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def api(trio: LocalCluster) -> Iterator[Swarm]:
    with Swarm(trio.nodes[0].home) as session:
        yield session


def started(home: Path, task_id: str, attempt: int = 0) -> bool:
    return f"task {task_id} (attempt {attempt}) of API session" in (home / "logs" / "agent.log").read_text()


def peers_running(cluster: LocalCluster) -> dict[str, int]:
    """Each live peer's running tasks, as `ipdc peers --json` shows them."""
    rows = json.loads(run_cli(["peers", "--json"], cluster.nodes[0].home).stdout)
    return {r["name"]: r["running"] for r in rows}


def slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)  # the task's own work: long enough to be interrupted
    return x * x


def test_cancel_stops_a_running_task_and_a_queued_one(api: Swarm, trio: LocalCluster) -> None:
    node = trio.nodes[2]
    name = node.config.node.name
    running = api.submit(slow_square, 3, 600, peer=name)
    assert wait_for(lambda: started(node.home, running.task_id), 30)
    assert wait_for(lambda: peers_running(trio)[name] == 1, 30)  # `ipdc peers` counts API tasks
    queued = api.submit(slow_square, running, 0, peer=name)  # waits for `running`, here
    assert queued.cancel() and queued.cancelled()
    assert running.cancel() and running.cancelled()
    # the runner was killed: the node's one slot takes the next task at once, not in 600 s
    after = api.submit(slow_square, 4, 0, peer=name)
    assert after.result(timeout=60) == 16
    assert not started(node.home, queued.task_id)
    assert "cancelled" in (node.home / "logs" / "agent.log").read_text()
    assert wait_for(lambda: peers_running(trio)[name] == 0, 30)


def test_a_task_that_kills_its_runner_fails_after_max_attempts_naming_its_peers(api: Swarm) -> None:
    def crash() -> None:
        os._exit(3)

    future = api.submit(crash)
    with pytest.raises(TaskFailed, match=r"failed 3 time\(s\)") as raised:
        future.result(timeout=120)
    assert len(future.peers) == 3 and len(set(future.peers)) == 3  # each retry on a peer not yet tried
    for peer in future.peers:
        assert peer in str(raised.value)
    assert "runner process" in str(raised.value)


def test_a_silent_session_is_dropped_after_the_lease_and_comes_back_fresh(api: Swarm,
                                                                        trio: LocalCluster) -> None:
    node = trio.nodes[1]
    name = node.config.node.name
    big = api.submit(lambda: b"x" * (1 << 20), peer=name)  # kept by CID on the worker
    assert big.result(timeout=60) == b"x" * (1 << 20)
    cid = big.stored().cid
    assert cid is not None and cid in node.kubo().pins()
    dropped = re.compile(rf"dropped API session api-[0-9a-f]+-{api.session}-\d+: silent")
    log = node.home / "logs" / "agent.log"
    assert wait_for(lambda: dropped.search(log.read_text()) is not None, 3 * LEASE)
    assert cid not in node.kubo().pins()
    assert api.submit(abs, -7, peer=name).result(timeout=60) == 7  # new runners for the same session


def test_a_worker_killed_mid_task_is_replaced_and_the_result_is_right(api: Swarm, trio: LocalCluster) -> None:
    futures = [api.submit(slow_square, x, 3) for x in range(3)]  # one slot per node: one each
    victim = next(n for n in trio.nodes[1:] if any(f.peer == n.config.node.name for f in futures))
    task = next(f for f in futures if f.peer == victim.config.node.name)
    assert wait_for(lambda: started(victim.home, task.task_id), 30)
    pid = victim.services["agent"].pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    try:
        assert [f.result(timeout=120) for f in futures] == [0, 1, 4]
        assert task.peers[0] == victim.config.node.name and len(task.peers) == 2
        assert task.peer != victim.config.node.name
    finally:
        victim.start()
