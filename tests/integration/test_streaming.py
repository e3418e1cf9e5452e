"""Hadoop Streaming jobs on a real 2-node swarm, whose agents run as root, and again as the
unprivileged ``ipdcagent`` (as in test_hostile.py): the mapper, combiner and reducer are
programs run in the job's sandbox with an argv (never a shell), an ``awk`` from the
workers' PATH and a C mapper compiled here and shipped with the job by CID.

Every count is checked against a reference computed here from the raw input bytes.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.errors import TaskFailed
from ipdc.jobs import shipped
from ipdc.node.cluster import LocalCluster
from ipdc.submit.mapreduce import MapReduceJob
from tests.helpers import AGENT_USER, cluster_as, read_output, reference_counts, run_cli
from tests.helpers import run_on as run
from tests.integration.test_mapreduce import make_text

USER = AGENT_USER
LIMITS = {"memory_mb": 512, "disk_mb": 64, "max_pids": 32, "task_timeout": 120.0}
#: Hadoop's streaming WordCount mapper, in awk: its fields are split on blanks (spaces and tabs).
AWK_MAPPER = "awk '{for (i = 1; i <= NF; i++) print $i \"\\t1\"}'"
SUM_REDUCE = shipped("streaming", "sum_reduce.py")
#: A WordCount mapper in C: words are runs of bytes that are not C-locale whitespace, as
#: Python's bytes.split() has them (tests.helpers.reference_counts).
C_MAPPER = r"""
#include <stdio.h>
#include <ctype.h>

int main(void) {
    int c, in_word = 0;
    while ((c = getchar()) != EOF) {
        if (isspace(c)) {
            if (in_word) fputs("\t1\n", stdout);
            in_word = 0;
        } else {
            putchar(c);
            in_word = 1;
        }
    }
    if (in_word) fputs("\t1\n", stdout);
    return ferror(stdout) ? 1 : 0;
}
"""
#: A Python reducer for string values (a command mapper's values are strings).
PY_REDUCE = "def reduce(word, counts):\n    return sum(int(c) for c in counts)\n"


@pytest.fixture(scope="module", params=["root", USER])
def swarm_as(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """Two nodes whose agents run as root, or as the unprivileged user."""
    with cluster_as(None if request.param == "root" else USER, "ipdc-streaming-", LIMITS) as cluster:
        yield cluster



def awk_counts(data: bytes) -> Counter[bytes]:
    """awk's fields: runs of bytes between spaces and tabs, line by line (a ``\\r`` is in a word)."""
    return Counter(word for line in data.split(b"\n") for word in re.split(rb"[ \t]+", line) if word)


def assert_output(output: Path, expected: Counter[bytes], k: int, command_reducer: bool) -> None:
    """Exact counts; each part's keys in the order a command reducer read them (bytewise),
    or a Python reducer's (the keys as strings, not UTF-8 bytes as surrogate escapes)."""
    counts, keys_per_part = read_output(output, k)
    assert counts == expected
    for keys in keys_per_part:
        if command_reducer:
            assert keys == sorted(keys)
        else:
            decoded = [key.decode("utf-8", "surrogateescape") for key in keys]
            assert decoded == sorted(decoded)
    assert (output / "_SUCCESS").exists()


def test_awk_mapper_and_a_shipped_python_reducer(swarm_as: LocalCluster, tmp_path: Path) -> None:
    data = make_text(tmp_path / "in.txt")
    assert b"\xff" in data and b"\r" in data and b"\t" in data
    result = run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=4, mapper=AWK_MAPPER,
                                        reducer=SUM_REDUCE.name, files=(SUM_REDUCE,), output=tmp_path / "out"))
    assert_output(result.output, awk_counts(data), 2, command_reducer=True)
    assert set(result.code) == {"sum_reduce.py"}


def test_a_c_mapper_built_here_with_a_python_reduce_file(swarm_as: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "wc_map.c").write_text(C_MAPPER)
    build = tmp_path / "build"
    build.mkdir()
    subprocess.run(["gcc", "-O2", "-o", str(build / "wc_map"), str(tmp_path / "wc_map.c")], check=True)
    data = make_text(tmp_path / "in.txt", lines=5000, seed=11)
    reduce_file = tmp_path / "Reduce.py"
    reduce_file.write_text(PY_REDUCE)
    result = run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=3, mapper=str(build / "wc_map"),
                                        reduce_file=reduce_file, files=(build / "wc_map",),
                                        output=tmp_path / "out"))
    assert_output(result.output, reference_counts(data), 2, command_reducer=False)
    assert set(result.code) == {"wc_map", "Reduce.py"}


def test_streaming_outputs_are_the_same_on_every_peer(swarm_as: LocalCluster, tmp_path: Path) -> None:
    """With --verify 2 every task runs on both peers and counts only when their output CIDs
    agree: a streaming task's map output and part are the same bytes wherever it runs."""
    data = make_text(tmp_path / "in.txt", seed=13)
    result = run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=3, mapper=AWK_MAPPER,
                                        combiner=SUM_REDUCE.name, reducer=SUM_REDUCE.name, files=(SUM_REDUCE,),
                                        verify=2, output=tmp_path / "out"))
    assert_output(result.output, awk_counts(data), 2, command_reducer=True)


def test_a_mapper_knows_its_input_file(swarm_as: LocalCluster, tmp_path: Path) -> None:
    """A directory input: each chunk's file, inside the input, reaches the mapper as Hadoop
    Streaming's ``mapreduce_map_input_file``; here the mapper counts lines per file."""
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_bytes(b"one\ntwo\nthree\n")
    (tmp_path / "docs" / "sub" / "b c.txt").write_bytes(b"x\n" * 500)
    mapper = "awk '{print ENVIRON[\"mapreduce_map_input_file\"] \"\\t1\"}'"
    result = run(swarm_as, MapReduceJob(tmp_path / "docs", k=2, chunks=4, mapper=mapper, reducer=SUM_REDUCE.name,
                                        files=(SUM_REDUCE,), output=tmp_path / "out"))
    assert read_output(result.output, 2)[0] == Counter({b"a.txt": 3, b"sub/b c.txt": 500})


def test_a_python_mapper_with_a_command_reducer(swarm_as: LocalCluster, tmp_path: Path) -> None:
    """The shipped WordCount Map.py (its values are ints) feeding the streaming reducer."""
    data = make_text(tmp_path / "in.txt", seed=9)
    result = run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, reducer=SUM_REDUCE.name, files=(SUM_REDUCE,),
                                        output=tmp_path / "out"))
    assert_output(result.output, reference_counts(data), 2, command_reducer=True)
    assert set(result.code) == {"Map.py", "sum_reduce.py"}


def test_a_combiner_runs_on_every_map_output(swarm_as: LocalCluster, tmp_path: Path) -> None:
    """The combiner marks its sums with a ``c``; the reducer refuses any value without one,
    so the job succeeds only if every map task's output went through the combiner."""
    data = make_text(tmp_path / "in.txt", seed=3)
    reduce_file = tmp_path / "Reduce.py"
    reduce_file.write_text("def reduce(word, sums):\n"
                           "    assert all(s.startswith('c') for s in sums), sums\n"
                           "    return sum(int(s[1:]) for s in sums)\n")
    combiner = "awk -F '\\t' '{sum[$1] += $2} END {for (w in sum) print w \"\\tc\" sum[w]}'"
    result = run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=4, mapper=AWK_MAPPER, combiner=combiner,
                                        reduce_file=reduce_file, output=tmp_path / "out"))
    counts, _ = read_output(result.output, 2)
    assert counts == awk_counts(data)


def test_a_failing_mapper_fails_the_job_with_its_exit_status_and_stderr(swarm_as: LocalCluster,
                                                                          tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_bytes(b"some words\n")
    failing = "awk 'BEGIN { print \"cannot parse record 7\" > \"/dev/stderr\"; exit 3 }'"
    with pytest.raises(TaskFailed) as raised:
        run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=1, mapper=failing, reducer="cat",
                                   max_attempts=1, output=tmp_path / "out"))
    message = str(raised.value)
    assert "exited with status 3" in message and "cannot parse record 7" in message
    assert any(node.config.node.name in message for node in swarm_as.nodes)  # the peer it ran on
    assert not (tmp_path / "out").exists()


def test_a_mapper_not_on_the_workers_path_is_named(swarm_as: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_bytes(b"some words\n")
    with pytest.raises(TaskFailed) as raised:
        run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=1, mapper="wc-mapper-nowhere -v",
                                   reducer="cat", max_attempts=1, output=tmp_path / "out"))
    message = str(raised.value)
    assert "'wc-mapper-nowhere' was not found" in message and "--file wc-mapper-nowhere" in message
    assert any(node.config.node.name in message for node in swarm_as.nodes)


def test_commands_run_inside_the_jobs_sandbox(swarm_as: LocalCluster, tmp_path: Path) -> None:
    """A command sees the sandbox's identity (uid 1000, hostname ipdc-job), not the agent's
    (root or ipdcagent), is held to its limits, and the node's home is not there for it to read."""
    (tmp_path / "in.txt").write_bytes(b"one line\n")
    result = run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=1, mapper="id -u", reducer="cat",
                                        output=tmp_path / "uid"))
    assert b"".join((result.output / f"part-{p:05d}").read_bytes() for p in range(2)) == b"1000\t\n"
    result = run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=1, mapper="hostname", reducer="cat",
                                        output=tmp_path / "host"))
    assert b"".join((result.output / f"part-{p:05d}").read_bytes() for p in range(2)) == b"ipdc-job\t\n"
    # the sandbox's limits hold for it too: 1 GB is past its address space (sandbox.memory_mb = 512)
    with pytest.raises(TaskFailed, match=r"exited with status 1; the end of its stderr:(?s:.)*MemoryError"):
        run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=1, mapper="python3 -c 'bytearray(1 << 30)'",
                                   reducer="cat", max_attempts=1, output=tmp_path / "big"))
    secrets = " ".join(str(node.home / "ipdc.conf") for node in swarm_as.nodes)
    with pytest.raises(TaskFailed, match="No such file or directory"):
        run(swarm_as, MapReduceJob(tmp_path / "in.txt", k=2, chunks=1, mapper=f"cat {secrets}", reducer="cat",
                                   max_attempts=1, output=tmp_path / "stolen"))


def test_the_cli_runs_a_streaming_job_through_the_nodes_controller(swarm: LocalCluster, tmp_path: Path) -> None:
    """``ipdc mr --mapper --combiner --reducer --file`` as a user types it; the job's record
    keeps its commands (so a restarted controller could take it up)."""
    data = make_text(tmp_path / "in.txt", seed=5)
    home = swarm.nodes[0].home
    done = run_cli(["mr", str(tmp_path / "in.txt"), "--k", "3", "--mapper", AWK_MAPPER, "--combiner", "sum_reduce.py",
                    "--reducer", "./sum_reduce.py", "--file", str(SUM_REDUCE), "-o", str(tmp_path / "out"),
                    "--json"], home)
    summary = json.loads(done.stdout)
    assert_output(tmp_path / "out", awk_counts(data), 3, command_reducer=True)
    record = json.loads(run_cli(["job", "status", summary["job_id"], "--json"], home).stdout)
    assert record["params"]["mapper"] == AWK_MAPPER and record["params"]["files"] == [str(SUM_REDUCE)]
    refused = run_cli(["mr", str(tmp_path / "in.txt"), "--mapper", "cat"], home, check=False)
    assert refused.returncode == 2 and "a --mapper job needs --reducer CMD, or --reduce FILE" in refused.stderr
