"""Attacks by a Hadoop Streaming job's own programs, in their sandbox, on a real 2-node
swarm whose agents run as root, and again as the unprivileged ``ipdcagent`` (as in
test_streaming.py). What Python user code tries in the same sandbox is in
test_hostile.py; these are the attacks a program started by the runner adds.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.node.cluster import LocalCluster
from ipdc.spawn import wait_for
from ipdc.submit.mapreduce import MapReduceJob
from tests.helpers import AGENT_USER, cluster_as, processes_with
from tests.helpers import run_on as run

LIMITS = {"memory_mb": 512, "disk_mb": 64, "max_pids": 32, "task_timeout": 120.0}
#: A mapper that leaves a daemon in a session of its own (out of the process group that
#: is killed with it) holding its stdout and stderr, looks at what its parent, the runner,
#: holds, and then counts its lines.
LEAVING_MAPPER = r"""#!/bin/sh
setsid sh -c 'echo $$ > daemon.pid.tmp && mv daemon.pid.tmp daemon.pid; exec sleep SECONDS' &
while [ ! -s daemon.pid ]; do :; done
printf 'daemon\t%s\n' "$(cat daemon.pid)"
for fd in /proc/$PPID/fd/*; do printf 'runner-fd\t%s\n' "$(readlink "$fd")"; done
tr '\0' '\n' < /proc/$PPID/environ | sed 's/^/runner-env\t/'
wc -l | sed 's/^ */lines\t/'
"""


@pytest.fixture(scope="module", params=["root", AGENT_USER])
def swarm_as(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with cluster_as(None if request.param == "root" else AGENT_USER, "ipdc-attack-stream-", LIMITS) as cluster:
        yield cluster


def test_a_daemon_that_leaves_the_group_holds_no_task_and_ends_with_the_job(swarm_as: LocalCluster,
                                                                           tmp_path: Path) -> None:
    """Each map task's program leaves a ``setsid`` daemon holding its pipes: the tasks end with
    their programs (the runner no longer waits for an end of file the daemon withholds,
    which held each task to its 120 s timeout), the counts are exact, the runner's fds and
    environment name nothing of the node, and no daemon is left once the job is done."""
    seconds = f"7{secrets.randbelow(10**6):06d}.5"
    mapper = tmp_path / "leave.sh"
    mapper.write_text(LEAVING_MAPPER.replace("SECONDS", seconds))
    lines = [f"line {i}" for i in range(1000)]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    result = run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=3, mapper=str(mapper), reducer="cat",
                                        files=(mapper,), max_attempts=1, output=tmp_path / "out"))
    seen: dict[str, list[str]] = {}
    for p in range(2):
        for line in (result.output / f"part-{p:05d}").read_text().splitlines():
            key, _, value = line.partition("\t")
            seen.setdefault(key, []).append(value)
    assert sum(map(int, seen["lines"])) == len(lines)
    assert len(seen["daemon"]) == len(seen["lines"]) == 3  # every task left one
    assert seen["runner-fd"] and seen["runner-env"]
    homes = [str(node.home) for node in swarm_as.nodes]
    kubo_secrets = [node.kubo_secret_file.read_text().strip() for node in swarm_as.nodes]
    for value in seen["runner-fd"] + seen["runner-env"]:
        assert not any(home in value for home in homes), value
        assert not any(secret in value for secret in kubo_secrets), value
    assert wait_for(lambda: processes_with(f"sleep {seconds}") == [], 30), processes_with(f"sleep {seconds}")
