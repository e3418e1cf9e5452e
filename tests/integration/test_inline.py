"""Inline payloads (ipdc/wire/inline.py) on a real swarm: the inline path and the IPFS
path give byte-identical outputs and the same result CID, at the threshold and one byte
either side of it, for input chunks, map outputs and parts alike; and a receiver refuses
inline bytes that are not what their CID names, even in a message a trusted key signed.

Which path a payload took is read from ``job.json``'s ``transport`` counters, so a test
whose payload did not go the way it claims fails.
"""

from __future__ import annotations

import base64
import io
import json
import queue
import random
import time
from pathlib import Path

import pytest

from ipdc.node.cluster import LocalCluster
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import JobResult, MapReduceController, MapReduceJob
from ipdc.submit.mrstate import Failed
from ipdc.trust import Signer
from ipdc.wire.buffer import BUFFER, Buffer
from ipdc.wire.cleanup import CLEANUP, CleanUp
from ipdc.wire.domap import DOMAP, DoMap
from ipdc.wire.download import DOWNLOAD, Download
from ipdc.wire.getresult import GetResult
from ipdc.wire.ids import JobId, NodeName
from ipdc.wire.inline import INLINE_MAX, pack
from ipdc.wire.manifest import JobManifest
from ipdc.wire.partition import read_partition, write_partitions
from ipdc.wire.unixfs import cid_of

#: The whole input is one key whose value is the input: the chunk, the one map output and the
#: part each grow byte for byte with it, so each can be set to an exact size.
MAP = "def map_chunk(text):\n    return {'k': text}.items()\n"
REDUCE = "def reduce(key, values):\n    return ''.join(values)\n"
WORDS = "from collections import Counter\n\ndef map_chunk(text):\n    return Counter(text.split()).items()\n"
COUNT = "def reduce(key, values):\n    return sum(values)\n"


def partition_size(n: int) -> int:
    """The size of the map output for an input of ``n`` letters (the partition format's own
    writer, used only to choose sizes; outputs are checked against the input itself)."""
    return len(write_partitions([("k", "a" * n)], 1)[0])


def input_for(target: str, size: int) -> int:
    """How many input bytes make the ``target`` payload exactly ``size`` bytes long."""
    if target == "chunk":
        return size
    if target == "part":
        return size - 3  # "k\t" + value + "\n"
    n = size - (partition_size(size) - size)
    assert partition_size(n) == size
    return n


def run(cluster: LocalCluster, tmp_path: Path, name: str, data: bytes, inline_max: int,
        map_code: str = MAP, reduce_code: str = REDUCE, k: int = 1) -> JobResult:
    """One job from node 0, with its own ``agent.inline_max``."""
    (tmp_path / "Map.py").write_text(map_code)
    (tmp_path / "Reduce.py").write_text(reduce_code)
    source = tmp_path / f"{name}.txt"
    source.write_bytes(data)
    node = cluster.nodes[0]
    config = node.config.replace(agent={"inline_max": inline_max})
    job = MapReduceJob(source, k=k, map_file=tmp_path / "Map.py", reduce_file=tmp_path / "Reduce.py",
                       output=tmp_path / f"out-{name}", chunks=1)
    with SwarmClient(config, node.signer).connect() as client, node.kubo() as kubo:
        return MapReduceController(client, kubo, job, node.home).run()


def parts(result: JobResult) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(result.output.glob("part-*"))}


@pytest.mark.parametrize("target", ["chunk", "output", "part"])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_inline_and_ipfs_paths_agree_at_the_threshold(swarm: LocalCluster, tmp_path: Path, target: str,
                                                      delta: int) -> None:
    n = input_for(target, INLINE_MAX + delta)
    rng = random.Random(n)
    data = "".join(rng.choice("abcdefghij") for _ in range(n)).encode()
    sizes = {"chunks": n, "outputs": partition_size(n), "parts": n + 3}
    assert sizes[{"chunk": "chunks", "output": "outputs", "part": "parts"}[target]] == INLINE_MAX + delta

    inline = run(swarm, tmp_path, "inline", data, INLINE_MAX)
    ipfs = run(swarm, tmp_path, "ipfs", data, 0)

    assert parts(inline) == parts(ipfs) == {"part-00000": b"k\t" + data + b"\n"}
    assert inline.result_cid == ipfs.result_cid
    assert inline.chunks == ipfs.chunks == [cid_of(data)]
    assert inline.tasks["map"][0]["output"] == ipfs.tasks["map"][0]["output"] == [
        cid_of(write_partitions([("k", data.decode())], 1)[0])]
    expected = {f"{what}_{'inline' if size <= INLINE_MAX else 'ipfs'}": 1 for what, size in sizes.items()}
    assert inline.transport == {"code_inline": 2, **expected}
    assert ipfs.transport == {"code_ipfs": 2, "chunks_ipfs": 1, "outputs_ipfs": 1, "parts_ipfs": 1}
    for result in (inline, ipfs):  # the record says the same
        assert json.loads((result.output / "job.json").read_text())["transport"] == result.transport


def test_a_wordcount_across_nodes_is_the_same_both_ways(swarm: LocalCluster, tmp_path: Path) -> None:
    """Map outputs cross nodes on Buffer (K=3); counts checked against the input itself."""
    rng = random.Random(5)
    lines = (" ".join(rng.choice(["x", "y", "z", "w"]) for _ in range(8)) for _ in range(300))
    data = "\n".join(lines).encode()
    inline = run(swarm, tmp_path, "inline", data, INLINE_MAX, WORDS, COUNT, k=3)
    ipfs = run(swarm, tmp_path, "ipfs", data, 0, WORDS, COUNT, k=3)
    assert parts(inline) == parts(ipfs)
    assert inline.result_cid == ipfs.result_cid
    counts: dict[str, int] = {}
    for text in parts(inline).values():
        for line in text.decode().splitlines():
            key, value = line.split("\t")
            counts[key] = int(value)
    assert counts == {w: data.split().count(w.encode()) for w in "xyzw"}
    assert inline.transport["outputs_inline"] >= 1 and "outputs_ipfs" not in inline.transport
    assert "parts_ipfs" not in inline.transport and "chunks_ipfs" not in inline.transport
    assert "outputs_inline" not in ipfs.transport and "parts_inline" not in ipfs.transport


def agent_log(cluster: LocalCluster, i: int) -> str:
    return (cluster.nodes[i].home / "logs" / "agent.log").read_text()


def wait_result(results: queue.Queue[GetResult], kind: str, timeout: float = 60) -> GetResult:
    deadline = time.monotonic() + timeout
    while True:
        result = results.get(timeout=max(0.01, deadline - time.monotonic()))
        if result.kind == kind:
            return result


def test_a_worker_refuses_inline_bytes_that_are_not_their_cid(swarm: LocalCluster, tmp_path: Path) -> None:
    """A trusted key signs a DoMap and a Buffer whose inline bytes are not the chunk's or the map
    output's: the worker refuses both, naming the CID and the signer, and runs nothing of them;
    the genuine messages sent after them are served with the genuine bytes."""
    node = swarm.nodes[0]
    worker = swarm.nodes[1].config.node.name
    good, evil = b"good good good\n", b"evil evil evil\n"
    with SwarmClient(node.config, node.signer).connect() as client, node.kubo() as kubo:
        signer: Signer = node.signer
        code = {"Map.py": WORDS.encode(), "Reduce.py": COUNT.encode()}
        code_cids = kubo.add_streams([(n, io.BytesIO(b)) for n, b in code.items()])
        job_id = JobId.new()
        manifest = JobManifest(job_id=job_id, owner=NodeName(client.name),
                               code=dict(zip(code, code_cids, strict=True)), chunks=[kubo.add_bytes(good)],
                               partitions=1, workers=[NodeName(worker)], submitter=signer.public_key,
                               params={"inline_max": INLINE_MAX})
        results = client.watch(job_id)
        try:
            client.send(DOWNLOAD, worker, Download(manifest, inline=pack(
                [(c, b) for c, b in zip(code_cids, code.values(), strict=True)], INLINE_MAX)))
            wait_result(results, "ready")
            chunk = manifest.chunks[0]
            forged = {chunk: base64.b64encode(evil).decode()}
            client.send(DOMAP, worker, DoMap(job_id, 0, 0, inline=forged))
            client.send(DOMAP, worker, DoMap(job_id, 0, 1, inline=pack([(chunk, good)], INLINE_MAX)))
            done = wait_result(results, "map")
            assert done.attempt == 1, "the forged attempt 0 must never run"
            (partition,) = done.cids
            data = base64.b64decode(done.inline[partition])
            assert read_partition(data)[0] == ["good"]  # the genuine bytes were mapped

            evil_partition = write_partitions([("evil", 3)], 1)[0]
            forged = {partition: base64.b64encode(evil_partition).decode()}
            client.send(BUFFER, worker, Buffer(job_id, 0, 0, partition, 0, inline=forged))
            client.send(BUFFER, worker, Buffer(job_id, 0, 0, partition, 1, inline=done.inline))
            reduced = wait_result(results, "reduce")
            assert reduced.attempt == 1
            part = base64.b64decode(reduced.inline[reduced.cids[0]])
            assert part == b"good\t3\n"
        finally:
            client.unwatch(job_id)
            client.send(CLEANUP, worker, CleanUp(job_id))
    log = agent_log(swarm, 1)
    for cid in (chunk, partition):
        refusals = [line for line in log.splitlines() if "refused a message" in line and cid in line]
        assert len(refusals) == 1 and signer.public_key in refusals[0], log[-3000:]


def test_the_controller_takes_a_report_with_forged_inline_bytes_as_a_failed_attempt(
        swarm: LocalCluster, tmp_path: Path) -> None:
    """A worker whose report carries bytes other than its CIDs' fails that attempt (the state
    machine retries it elsewhere); nothing of the report is held or relayed."""
    node = swarm.nodes[0]
    (tmp_path / "in.txt").write_bytes(b"a b c\n")
    with SwarmClient(node.config, node.signer).connect() as client, node.kubo() as kubo:
        controller = MapReduceController(client, kubo, MapReduceJob(tmp_path / "in.txt", k=1), node.home)
        controller.sent["n-liar"] = {"d" * 32}
        claimed = cid_of(b"the real output")
        lie = GetResult(controller.job_id, NodeName("n-liar"), "map", task=0, attempt=2, cids=[claimed],
                        re="d" * 32, inline={claimed: base64.b64encode(b"a forged output").decode()})
        event = controller.event_of(lie)
    assert isinstance(event, Failed)
    assert (event.peer, event.phase, event.task, event.attempt) == ("n-liar", "map", 0, 2)
    assert claimed in event.error and "worker n-liar" in event.error
    assert controller.payloads.relay(claimed) == {}
