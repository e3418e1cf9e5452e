"""MapReduce on four namespaced hosts: the happy path, then one fault per test.

Host 0 hosts the broker and submits ``ipdc -v mr --k 3``; with four live nodes and
K=3, one host is a spare. Faults are placed deterministically with gated user code
(see harness.Gates): the test waits until every worker is held inside map (or
reduce), injects the fault, then opens the gate. Every result is checked against an
independent WordCount of the raw input bytes (tests.helpers.reference_counts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import read_output, reference_counts
from tests.multihost.harness import Cluster, Gates, Host, write_input

pytestmark = pytest.mark.netns

K = 3
#: One map task per worker (each node has --slots 1), so every worker holds exactly one
#: task at the map gate and the spare gets only what is reassigned to it.
CHUNKS = 3
JOB_TIMEOUT = 120


def assert_exact(output: Path, data: bytes) -> None:
    """Counts equal an independent WordCount, each part is sorted, and the job succeeded."""
    counts, keys_per_part = read_output(output, K)
    assert counts == reference_counts(data)
    for keys in keys_per_part:
        decoded = [key.decode() for key in keys]
        assert decoded == sorted(decoded)
    assert (output / "_SUCCESS").exists()


def spare_of(cluster: Cluster, workers: set[Host]) -> Host:
    """The one host the job did not choose: the XOR-next peer, so the replacement."""
    (spare,) = [h for h in cluster.hosts if h not in workers]
    return spare


def victim_of(workers: set[Host]) -> Host:
    """A worker that is not host 0, so the submitter and the broker stay untouched."""
    return min((h for h in workers if h.index != 0), key=lambda h: h.index)


def assert_moved(summary: dict[str, Any], kind: str, victim: Host, spare: Host) -> None:
    """job.json records the victim's ``kind`` tasks as moved to the spare; for map tasks,
    the accepted output must then come from the spare too (the record tells the truth)."""
    moved = [r for r in summary["reassigned"] if r["kind"] == kind and r["from"] == victim.name]
    assert moved, f"no {kind} task of {victim.name} was reassigned: {summary['reassigned']}"
    assert {r["to"] for r in moved} == {spare.name}, summary["reassigned"]
    if kind == "map":
        producers = {r["task"]: summary["map_tasks"][str(r["task"])] for r in moved}
        assert set(producers.values()) == {spare.name}, \
            f"reassigned to {spare.name}, but the accepted outputs came from {producers}"


def test_wordcount_on_four_hosts(cluster: Cluster, tmp_path: Path) -> None:
    """The baseline: nodes that meet only over the LAN run a job exactly."""
    data = write_input(tmp_path / "input.txt")
    job = cluster.submit(tmp_path / "input.txt", tmp_path / "out", chunks=6)
    summary = job.result(JOB_TIMEOUT)
    assert_exact(job.output, data)
    assert json.loads((job.output / "job.json").read_text()) == summary
    names = {h.name for h in cluster.hosts}
    workers = {w["name"] for w in summary["workers"]}
    assert len(workers) == K and workers <= names
    assert set(summary["map_tasks"].values()) <= workers
    assert summary["reassigned"] == []


@pytest.mark.parametrize("phase, gated", [("map", ("map", "reduce")), ("reduce", ("reduce",))])
def test_worker_lost_mid_task_is_replaced_by_the_spare(cluster: Cluster, gates: Gates, tmp_path: Path,
                                                      phase: str, gated: tuple[str, ...]) -> None:
    """A crashed agent (kill -9: the broker fires its last will) while every worker is held in
    ``phase``: a lost mapper's running task, or a lost reducer's partition with every map
    output it needs, moves to the spare."""
    data = write_input(tmp_path / "input.txt")
    job = cluster.submit(tmp_path / "input.txt", tmp_path / "out", chunks=CHUNKS,
                         **{f"{g}_file": gates.file(g) for g in gated})
    held = cluster.wait_at_gate(job, gates, phase, hosts=K)
    victim, spare = victim_of(held), spare_of(cluster, held)
    cluster.kill_agent(victim)
    for g in gated:
        gates.open(g)
    summary = job.result(JOB_TIMEOUT)
    assert_exact(job.output, data)
    # a lost reducer's finished map output lived in the lost node too: computed again elsewhere
    assert victim.name not in summary["map_tasks"].values()
    assert_moved(summary, phase, victim, spare)
    assert spare in cluster.hosts_at_gate(gates, phase), f"the spare's {phase} code never ran"


def test_partitioned_worker_is_replaced_and_its_late_result_ignored(
        cluster: Cluster, gates: Gates, tmp_path: Path) -> None:
    """A worker that is cut off is alive: only its silence tells, and it reports late."""
    data = write_input(tmp_path / "input.txt")
    job = cluster.submit(tmp_path / "input.txt", tmp_path / "out", chunks=CHUNKS,
                         map_file=gates.file("map"), reduce_file=gates.file("reduce"))
    workers = cluster.wait_at_gate(job, gates, "map", hosts=K)
    victim, spare = victim_of(workers), spare_of(cluster, workers)
    with cluster.cut_off(victim):
        job.wait_until(lambda: spare in cluster.hosts_at_gate(gates, "map"), 60,
                       f"the spare {spare.label} to re-run the map task of the cut-off {victim.label}")
        # The cut-off worker finishes its map too; its result can only arrive late.
        gates.open("map")
    job.wait_for_log(rf"ignored late \w+ result for task \d+ attempt \d+ from {re.escape(victim.name)}", 60)
    gates.open("reduce")
    summary = job.result(JOB_TIMEOUT)
    assert_exact(job.output, data)
    assert victim.name not in summary["map_tasks"].values()
    assert_moved(summary, "map", victim, spare)


def test_broker_restart_mid_job_loses_nothing(cluster: Cluster, gates: Gates, tmp_path: Path) -> None:
    """Persistence, persistent sessions and QoS 1 carry every message over a restart."""
    data = write_input(tmp_path / "input.txt")
    job = cluster.submit(tmp_path / "input.txt", tmp_path / "out", chunks=CHUNKS,
                         map_file=gates.file("map"), reduce_file=gates.file("reduce"))
    cluster.wait_at_gate(job, gates, "map", hosts=K)
    cluster.restart_broker()
    assert job.proc.poll() is None, "the job ended while the broker restarted"
    gates.open_all()
    summary = job.result(JOB_TIMEOUT)
    assert_exact(job.output, data)
    # Every agent reconnects within a second or so: a broker restart is not a lost worker.
    assert summary["reassigned"] == [], f"the broker restart cost workers: {summary['reassigned']}"
