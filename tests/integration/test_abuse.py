"""What one member can do to the others' work, and the submitter that vanishes.

* A member publishes malformed retained presences (deep nesting, a 5000-digit
  integer, NaN) and a heartbeat that claims another node's name: every other
  node's ``ipdc peers`` and ``ipdc mr`` still work, and the false heartbeat changes
  nothing.
* A submitter is killed with ``kill -9`` in the middle of a job: after the
  workers' ``agent.job_lease`` every node is clean, with no work dir, runner
  process or pin of that job, and the next job gives exact counts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.bus import Bus, client_id
from ipdc.control.history import DB_NAME, History
from ipdc.node.cluster import LocalCluster
from ipdc.node.lifecycle import Node
from ipdc.spawn import wait_for
from ipdc.submit.client import SwarmClient
from ipdc.wire.heartbeat import HEARTBEAT, Heartbeat
from ipdc.wire.ids import NodeName
from tests.helpers import live_runners, read_output, reference_counts, run_cli

pytestmark = pytest.mark.timeout(300)

LEASE = 4.0


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    settings = {"agent": {"job_lease": LEASE, "heartbeat_interval": 0.5, "peer_timeout": 3.0}}
    with LocalCluster(3, base=tmp_path_factory.mktemp("abuse"), settings=settings) as cluster:
        yield cluster


def names(cluster: LocalCluster) -> list[str]:
    return [node.config.node.name for node in cluster.nodes]


def test_a_malformed_retained_presence_breaks_no_other_node(trio: LocalCluster, tmp_path: Path) -> None:
    honest, liar = trio.nodes[:2], trio.nodes[2]
    name = liar.config.node.name
    victim = honest[0].config.node.name
    deep = b"[" * 100_000 + b"]" * 100_000
    payloads = [deep, b'{"name": "%s", "ts": ' % name.encode() + b"9" * 5000 + b"}",
                b'{"name": "%s", "ts": NaN}' % name.encode()]
    try:
        with Bus(liar.config.broker, client_id(name, "liar")) as bus:
            bus.connect()
            for payload in payloads:  # the ACL lets a node write its own presence, and only that
                bus.publish(f"ipdc/presence/{name}", payload, retain=True)
            # on its own topic, claiming the victim's name
            forged = Heartbeat(NodeName(victim), 1e9, 0.0, 999)
            bus.publish(HEARTBEAT.topic(node=name), HEARTBEAT.encode(forged), retain=True)
            assert bus.flush()
        for node in honest:
            listed = json.loads(run_cli(["peers", "--json"], node.home).stdout)
            assert {p["name"] for p in listed} == set(names(trio)[:2])
        with SwarmClient(honest[0].config).connect() as client:
            assert wait_for(lambda: client.peers.is_live(victim), 10)
            assert all(p.running != 999 for p in client.peers.live())
        data = b"red green blue\ngreen blue\nblue\n" * 30
        (tmp_path / "in.txt").write_bytes(data)
        for i, node in enumerate(honest):
            out = tmp_path / f"out{i}"
            run_cli(["mr", str(tmp_path / "in.txt"), "--k", "2", "-o", str(out), "-q"], node.home)
            assert read_output(out, 2)[0] == reference_counts(data)
    finally:
        Node(liar.home).services["agent"].stop()
        Node(liar.home).start()  # it announces itself again, replacing the garbage


SLOW_MAP = "import time\n\ndef map(line):\n    time.sleep(0.5)\n    return [(w, 1) for w in line.split()]\n"


def job_dirs(cluster: LocalCluster) -> dict[str, list[str]]:
    return {node.config.node.name: sorted(p.name for p in node.work_dir.iterdir()) for node in cluster.nodes}


def test_a_killed_submitters_job_is_dropped_everywhere_after_the_lease(trio: LocalCluster,
                                                                       tmp_path: Path) -> None:
    kubos = [node.kubo() for node in trio.nodes]
    try:
        before = [k.pins() for k in kubos]
        data = b"one two three four\n" * 24
        (tmp_path / "in.txt").write_bytes(data)
        (tmp_path / "slow.py").write_text(SLOW_MAP)
        submitter = trio.nodes[0]
        argv = [sys.executable, "-m", "ipdc.cli", "mr", str(tmp_path / "in.txt"), "--k", "3", "--chunks", "6",
                "--map", str(tmp_path / "slow.py"), "-q", "-o", str(tmp_path / "later")]
        proc = subprocess.Popen(argv, env={**os.environ, "IPDC_HOME": str(submitter.home)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert wait_for(lambda: all(job_dirs(trio).values()), 60), job_dirs(trio)
        job_id = next(iter(job_dirs(trio).values()))[0].split("-", 1)[1]
        spares = sum(node.config.agent.warm_runners for node in trio.nodes)
        assert wait_for(lambda: live_runners(trio) > spares, 30), "the job's runners never showed up"
        # the job's controller runs in the node's controller service: that is the submitter to kill
        os.kill(submitter.services["control"].pid() or 0, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        def clean() -> bool:
            return (not any(job_dirs(trio).values()) and [k.pins() for k in kubos] == before
                    and live_runners(trio) == spares)
        left = [k.pins() - b for k, b in zip(kubos, before, strict=True)]
        assert wait_for(clean, LEASE + 30, 0.2), (job_dirs(trio), left)
        for node in trio.nodes:
            log = (node.home / "logs" / "agent.log").read_text()
            assert f"dropped job {job_id}: its submitter has said nothing" in log
        submitter_log = (submitter.home / "logs" / "agent.log").read_text()
        assert f"unpinned the input and code of job {job_id}" in submitter_log
        assert not (tmp_path / "later").exists()
        # a controller service that comes back after the lease takes the job up, but the workers
        # dropped it for good: it ends failed rather than hanging, and leaves nothing behind
        run_cli(["node", "start"], submitter.home)
        history = History(submitter.home / DB_NAME)
        assert wait_for(lambda: (history.job(job_id) or {}).get("state") in ("succeeded", "failed"), 120, 0.2)
        row = history.job(job_id) or {}
        assert row["state"] == "failed" and not (tmp_path / "later").exists()
        # the workers said why at once (not after agent.ready_timeout of silence)
        assert "it was dropped: its submitter has said nothing for" in row["error"], row["error"]
        assert wait_for(clean, 30, 0.2)
        # the swarm serves the next job
        run_cli(["mr", str(tmp_path / "in.txt"), "--k", "3", "-o", str(tmp_path / "out"), "-q"],
                submitter.home)
        assert read_output(tmp_path / "out", 3)[0] == reference_counts(data)
    finally:
        for k in kubos:
            k.close()
