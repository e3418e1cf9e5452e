"""Issue 3: MapReduce end to end on a real 3-node swarm and on the embedded default.

Every count is checked against an independent reference computed from the raw
input bytes (tests.helpers.reference_counts), never against IPDC's own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ipdc.config import Config, save_config
from ipdc.errors import JobError, NotEnoughPeers, TaskFailed
from ipdc.node.cluster import LocalCluster
from ipdc.node.lifecycle import Node
from ipdc.spawn import wait_for
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import JobResult, MapReduceController, MapReduceJob
from tests.helpers import REPO, read_output, reference_counts, run_cli

WORDS = ["the", "The", "café", "naïve", "Ünïcödé", "日本語", "中文字", "한국어", "🚀", "🌍x", "e\u0301",
         "Ωmega", "data", "ipfs", "MAP", "reduce", "a", "b"]


def make_text(path: Path, lines: int = 3000, seed: int = 7) -> bytes:
    """Multi-language text with CRLF lines, empty lines, tabs, and invalid UTF-8 bytes."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(0, 12))]
        line = " ".join(words).encode()
        if i % 7 == 0:
            line += b"\r"  # CRLF line end
        if i % 11 == 0:
            line += b" bad\xff\xfe byte\x80s \xc3("  # not UTF-8
        if i % 13 == 0:
            line = b"\t" + line.replace(b" ", b"\t  ")
        out.append(line)
    data = b"\n".join(out) + b"\n"
    path.write_bytes(data)
    return data


def run_job(cluster: LocalCluster, job: MapReduceJob, node: int = 0) -> JobResult:
    config = cluster.nodes[node].config
    with SwarmClient(config, cluster.nodes[node].signer).connect() as client, \
            cluster.nodes[node].kubo() as kubo:
        return MapReduceController(client, kubo, job, cluster.nodes[node].home).run()


def assert_exact(result: JobResult, data: bytes, k: int) -> None:
    counts, keys_per_part = read_output(result.output, k)
    assert counts == reference_counts(data)
    for keys in keys_per_part:
        decoded = [key.decode("utf-8", "surrogateescape") for key in keys]
        assert decoded == sorted(decoded)
    assert (result.output / "_SUCCESS").exists()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_counts_match_reference_for_k(swarm: LocalCluster, tmp_path: Path, k: int) -> None:
    data = make_text(tmp_path / "input.txt")
    result = run_job(swarm, MapReduceJob(tmp_path / "input.txt", k=k, output=tmp_path / "out"))
    assert_exact(result, data, k)
    manifest = json.loads((result.output / "job.json").read_text())
    assert manifest["job_id"] == result.job_id and len(manifest["parts"]) == k
    assert len(manifest["chunks"]) >= 1 and set(manifest["code"]) == {"Map.py", "Reduce.py"}


def test_line_by_line_map_with_and_without_combine(swarm: LocalCluster, tmp_path: Path) -> None:
    """The plain map(line) contract, with combine and then without it."""
    data = make_text(tmp_path / "input.txt", lines=2000, seed=3)
    plain = tmp_path / "Map.py"
    plain.write_text("def map(line):\n    for w in line.split():\n        yield w, 1\n\n"
                     "def combine(w, counts):\n    return sum(counts)\n")
    result = run_job(swarm, MapReduceJob(tmp_path / "input.txt", k=2, map_file=plain,
                                         output=tmp_path / "a", chunks=5))
    assert_exact(result, data, 2)
    plain.write_text("def map(line):\n    for w in line.split():\n        yield w, 1\n")
    result = run_job(swarm, MapReduceJob(tmp_path / "input.txt", k=3, map_file=plain,
                                         output=tmp_path / "b", chunks=4))
    assert_exact(result, data, 3)


def test_five_megabyte_single_line(swarm: LocalCluster, tmp_path: Path) -> None:
    rng = random.Random(5)
    data = " ".join(rng.choice(WORDS) + str(rng.randint(0, 5000)) for _ in range(700_000)).encode()
    assert len(data) > 5_000_000 and b"\n" not in data
    (tmp_path / "one-line.txt").write_bytes(data)
    result = run_job(swarm, MapReduceJob(tmp_path / "one-line.txt", k=3, output=tmp_path / "out"))
    assert_exact(result, data, 3)


def test_fewer_keys_than_reducers_and_empty_input(swarm: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "few.txt").write_bytes(b"a a a\n")
    result = run_job(swarm, MapReduceJob(tmp_path / "few.txt", k=3, output=tmp_path / "few"))
    assert_exact(result, b"a a a\n", 3)
    assert sorted(len(keys) for keys in read_output(result.output, 3)[1]) == [0, 0, 1]
    (tmp_path / "empty.txt").write_bytes(b"")
    result = run_job(swarm, MapReduceJob(tmp_path / "empty.txt", k=3, output=tmp_path / "empty"))
    assert [(result.output / f"part-{p:05d}").read_bytes() for p in range(3)] == [b""] * 3


def test_two_masters_at_once(swarm: LocalCluster, tmp_path: Path) -> None:
    inputs = [make_text(tmp_path / f"in{i}.txt", lines=2500, seed=i) for i in range(2)]
    results: dict[int, JobResult] = {}
    errors: list[BaseException] = []

    def submit(i: int, node: int) -> None:
        try:
            results[i] = run_job(swarm, MapReduceJob(tmp_path / f"in{i}.txt", k=3,
                                                     output=tmp_path / f"out{i}"), node=node)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(0, 0)), threading.Thread(target=submit, args=(1, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert results[0].job_id != results[1].job_id
    for i in range(2):
        assert_exact(results[i], inputs[i], 3)


def test_workers_are_the_xor_nearest_live_peers(swarm: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x y z\n")
    result = run_job(swarm, MapReduceJob(tmp_path / "in.txt", k=2, output=tmp_path / "out"))
    recorded = json.loads((result.output / "job.json").read_text())["workers"]
    peers = [n.peer_id() for n in swarm.nodes]
    key = int(hashlib.sha256(result.job_id.encode()).hexdigest(), 16)
    expected = sorted(peers, key=lambda p: int(hashlib.sha256(p.encode()).hexdigest(), 16) ^ key)[:2]
    assert [w["peer_id"] for w in recorded] == expected


def test_cleanup_removes_the_jobs_work_dirs(swarm: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("clean up after me\n" * 100)
    result = run_job(swarm, MapReduceJob(tmp_path / "in.txt", k=3, output=tmp_path / "out"))
    dirs = [n.work_dir / result.job_id for n in swarm.nodes]
    assert wait_for(lambda: not any(d.exists() for d in dirs), 20)


def test_map_that_raises_fails_fast_with_the_remote_traceback(swarm: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("fine\nboom here\n")
    bad = tmp_path / "Map.py"
    bad.write_text("def map(line):\n    if 'boom' in line:\n        raise ValueError('user code exploded')\n"
                   "    yield line, 1\n")
    with pytest.raises(TaskFailed) as info:
        run_job(swarm, MapReduceJob(tmp_path / "in.txt", k=2, map_file=bad, output=tmp_path / "out"))
    names = {n.config.node.name for n in swarm.nodes}
    assert info.value.peer in names
    assert "ValueError: user code exploded" in info.value.remote_traceback
    assert "Map.py" in info.value.remote_traceback and not (tmp_path / "out").exists()
    # the swarm keeps serving
    (tmp_path / "ok.txt").write_text("still alive\n")
    assert_exact(run_job(swarm, MapReduceJob(tmp_path / "ok.txt", k=3, output=tmp_path / "ok")),
                 b"still alive\n", 3)


@contextmanager
def file_limit(cluster: LocalCluster, i: int, file_mb: int) -> Iterator[Node]:
    """Node ``i``'s agent restarted with another sandbox.file_mb (its runners' RLIMIT_FSIZE,
    which user code can see: the one thing that tells it which node it runs on)."""
    original = cluster.nodes[i].config

    def restart(config: Config) -> Node:
        cluster.nodes[i].services["agent"].stop()
        save_config(config, cluster.nodes[i].conf_path)
        cluster.nodes[i] = Node(cluster.nodes[i].home)
        cluster.nodes[i].start()
        return cluster.nodes[i]

    try:
        yield restart(original.replace(sandbox={"file_mb": file_mb}))
    finally:
        restart(original)


def test_a_task_that_fails_on_one_peer_is_retried_on_another(swarm: LocalCluster, tmp_path: Path) -> None:
    """A broken node (here: user code that fails only under node 1's file limit) must not sink
    the job while healthy peers can run its tasks: with --max-attempts 2, every task that
    failed there is retried elsewhere, and the counts are exact."""
    data = make_text(tmp_path / "in.txt", lines=4000)
    flaky = tmp_path / "Map.py"
    flaky.write_text("import resource\nfrom collections import Counter\n\n"
                     "def map_chunk(text):\n"
                     "    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] == 4095 << 20:\n"
                     "        raise RuntimeError('this node is broken')\n"
                     "    return Counter(text.split()).items()\n")
    with file_limit(swarm, 1, 4095) as broken:
        result = run_job(swarm, MapReduceJob(tmp_path / "in.txt", k=3, map_file=flaky, chunks=9, max_attempts=2,
                                             output=tmp_path / "out"))
    assert_exact(result, data, 3)
    assert broken.config.node.name not in result.map_tasks.values()


def test_clear_errors_before_touching_the_swarm(swarm: LocalCluster, tmp_path: Path) -> None:
    with pytest.raises(JobError, match="does not exist"):
        run_job(swarm, MapReduceJob(tmp_path / "missing.txt", k=1))
    (tmp_path / "in.txt").write_text("a\n")
    broken = tmp_path / "Reduce.py"
    broken.write_text("def reduce(k, v):\n    return sum(v\n")
    with pytest.raises(JobError, match="syntax error"):
        run_job(swarm, MapReduceJob(tmp_path / "in.txt", k=1, reduce_file=broken))
    with pytest.raises(NotEnoughPeers, match="3 peer"):
        run_job(swarm, MapReduceJob(tmp_path / "in.txt", k=5))


def test_cli_against_a_running_node_and_its_failure_exit(swarm: LocalCluster, tmp_path: Path) -> None:
    data = make_text(tmp_path / "in.txt", lines=500)
    home = swarm.nodes[1].home
    done = run_cli(["mr", "--k", "2", str(tmp_path / "in.txt"), "--json", "-o", str(tmp_path / "out")], home)
    summary = json.loads(done.stdout)
    assert summary["result_cid"].startswith("b") and len(summary["workers"]) == 2
    assert read_output(tmp_path / "out", 2)[0] == reference_counts(data)
    bad = tmp_path / "Map.py"
    bad.write_text("def map(line):\n    raise KeyError('nope')\n")
    done = run_cli(["mr", "--k", "2", str(tmp_path / "in.txt"), "--map", str(bad), "-q"], home, check=False)
    assert done.returncode != 0 and "KeyError" in done.stderr and "Traceback" in done.stderr
    done = run_cli(["mr", str(tmp_path / "nope.txt")], home, check=False)
    assert done.returncode != 0 and "does not exist" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("k", [1, 2, 3])
def test_embedded_default_cluster(tmp_path: Path, k: int) -> None:
    """No node runs for this IPDC_HOME: `ipdc mr` brings up a temporary cluster."""
    data = make_text(tmp_path / "in.txt", lines=800, seed=11 + k)
    home = tmp_path / "no-node-here"
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    done = run_cli(["mr", "--k", str(k), str(tmp_path / "in.txt"), "-o", str(tmp_path / "out")], home,
                   env={"TMPDIR": str(private_tmp)})
    assert "temporary local cluster" in done.stderr
    assert "output:" in done.stdout and str(tmp_path / "out") in done.stdout
    assert read_output(tmp_path / "out", k)[0] == reference_counts(data)
    assert not list(private_tmp.iterdir()), "the temporary cluster was left behind"


def test_shipped_example_with_four_workers(tmp_path: Path) -> None:
    """The README's first command: `ipdc mr --k 4` on the shipped example input."""
    example = REPO / "ipdc" / "jobs" / "mapreduce" / "input.txt"
    done = run_cli(["mr", "--k", "4", str(example)], tmp_path / "home", cwd=tmp_path)
    out_dir = Path(done.stdout.split("output:")[1].split()[0])
    assert out_dir.parent == tmp_path / "ipdc-out"
    assert read_output(out_dir, 4)[0] == reference_counts(example.read_bytes())


def test_result_directory_is_the_one_ipfs_add_makes_and_is_pinned(swarm: LocalCluster, tmp_path: Path) -> None:
    """The result directory is built from CIDs alone (dag/put); it must be byte for byte the
    directory `ipfs add -r` makes of the same files, so a user can check it either way."""
    files = {"part-00000": b"a\t1\n", "part-00001": b"", "part-00002": os.urandom(600_000)}
    for name, data in files.items():
        (tmp_path / "dir" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "dir" / name).write_bytes(data)
    with swarm.nodes[2].kubo() as kubo:
        parts = {name: kubo.add_bytes(data) for name, data in files.items()}
        sizes = {name: kubo.cumulative_size(cid) for name, cid in parts.items()}
        made = kubo.make_directory(parts, sizes)
        added = kubo._post("add", {"recursive": "true", "cid-version": "1", "raw-leaves": "true", "pin": "false"},
                           files=[("file", (f"dir/{n}", d, "application/octet-stream")) for n, d in files.items()])
        assert made == json.loads(added.text.splitlines()[-1])["Hash"]
        assert made in kubo._json("pin/ls", {"arg": made, "type": "recursive"})["Keys"]
        root = kubo.get(made, tmp_path / "got")
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files
