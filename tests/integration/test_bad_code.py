"""Issue 6: a Map.py that never ends, eats memory or forks without end, end to end.

Each bad job goes through ``ipdc mr`` on a real 2-node swarm whose nodes run user
code under small limits (their ipdc.conf ``sandbox`` section). The job must fail
with one message that names the problem and the setting, and the next normal job
on the same swarm must give exact counts: the agents and their runner pools live on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.node.cluster import LocalCluster
from ipdc.spawn import wait_for
from tests.helpers import bad_map, members, read_output, reference_counts, run_cli, runner_groups

LIMITS = {"task_timeout": 5.0, "memory_mb": 1024, "max_pids": 16}
DATA = "the quick brown fox\r\njumps over the lazy dog \udcff\udcfe the end\n".encode(
    "utf-8", "surrogateescape") * 200

INFINITE_LOOP = bad_map("infinite loop", chunk=False)
TEN_GB = bad_map("10 GB", chunk=False)
FORK_BOMB = bad_map("fork bomb", chunk=False)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(2, base=tmp_path_factory.mktemp("limited"), settings={"sandbox": LIMITS}) as cluster:
        assert all(node.config.sandbox.task_timeout == LIMITS["task_timeout"] for node in cluster.nodes)
        yield cluster


def submit(cluster: LocalCluster, work: Path, map_source: str | None) -> tuple[int, str]:
    """``ipdc mr --k 2 --max-attempts 1`` from node 0; (exit code, stderr)."""
    (work / "in.txt").write_bytes(DATA)
    args = ["mr", "--k", "2", "--max-attempts", "1", "-q", "-o", str(work / "out"), str(work / "in.txt")]
    if map_source is not None:
        (work / "Map.py").write_text(map_source)
        args += ["--map", str(work / "Map.py")]
    done = run_cli(args, cluster.nodes[0].home, check=False, timeout=120)
    return done.returncode, done.stderr


def assert_next_job_is_exact(cluster: LocalCluster, work: Path) -> None:
    (work / "next").mkdir()
    code, stderr = submit(cluster, work / "next", None)
    assert code == 0, stderr
    assert read_output(work / "next" / "out", 2)[0] == reference_counts(DATA)


def test_an_infinite_loop_fails_the_job_and_names_the_timeout(limited: LocalCluster, tmp_path: Path) -> None:
    code, stderr = submit(limited, tmp_path, INFINITE_LOOP)
    assert code != 0
    assert "was killed after 5 s wall-clock (sandbox.task_timeout)" in stderr
    assert_next_job_is_exact(limited, tmp_path)


def test_a_10_gb_allocation_fails_the_job_and_names_the_memory_limit(limited: LocalCluster,
                                                                      tmp_path: Path) -> None:
    code, stderr = submit(limited, tmp_path, TEN_GB)
    assert code != 0
    assert "exceeded the memory limit of 1024 MB (sandbox.memory_mb)" in stderr and "MemoryError" in stderr
    assert_next_job_is_exact(limited, tmp_path)


def test_a_fork_bomb_fails_the_job_and_is_contained(limited: LocalCluster, tmp_path: Path) -> None:
    groups = runner_groups(limited)
    agents = len(limited.nodes)
    limit = str(LIMITS["max_pids"])
    spares_held = [g for g in groups if members(g) and (g / "pids.max").read_text().strip() == limit]
    if len({g.parent for g in spares_held}) < agents:
        pytest.fail("no pids cgroup holds the agents' runners here, so the fork bomb is not run: "
                    "it would not be contained")
    code, stderr = submit(limited, tmp_path, FORK_BOMB)
    assert code != 0
    assert "was killed after 5 s wall-clock (sandbox.task_timeout)" in stderr
    assert f"limit of {LIMITS['max_pids']} processes (sandbox.max_pids)" in stderr
    # every bomb group was emptied and removed: what is left are idle spares, each bubblewrap,
    # the sandbox's init and the runner
    assert wait_for(lambda: all(len(members(g)) <= 3 for g in runner_groups(limited)), 30)
    assert_next_job_is_exact(limited, tmp_path)
