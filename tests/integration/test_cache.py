"""Issue 14, item 6: results cached swarm-wide, on a real 3-node swarm.

A job identical to one a member computed returns that member's result at once;
one byte changed in Map.py or in the input computes again; ``--no-cache`` computes.
Forged records sit on the real broker as retained messages published by a member:
signed by a key the submitting node does not trust, or naming a result no peer
holds, they are ignored and the job computes; only a trusted, retrievable record is
used. Counts are checked against tests.helpers.reference_counts.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from ipdc.control.history import DB_NAME, History
from ipdc.node.cluster import LocalCluster
from ipdc.node.lifecycle import Node
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import JOBS_DIR
from ipdc.trust import Signer
from ipdc.wire.cache import CACHE, CacheRecord, cache_key
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.record import SWARM
from ipdc.wire.unixfs import cid_of, cid_of_file
from tests.helpers import read_output, reference_counts, run_cli

#: A map whose chunks take DELAY seconds each (standing for real work): the first run is long
#: enough that a cache hit's share of it stays well under 10 % on a loaded machine, where
#: a cached run (the CLI's start included) took from 0.2 to 0.8 s.
SLOW_MAP = ("import time\nfrom collections import Counter\n\nDELAY = {delay}\n\n"
            "def map_chunk(text):\n    time.sleep(DELAY)\n    return Counter(text.split()).items()\n")


def make_input(path: Path, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [f"w{seed}x{i}" for i in range(500)] + ["the", "ü"]
    data = "".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) + "\n"
                   for _ in range(20_000)).encode()
    path.write_bytes(data)
    return data


def mr(node: Node, args: list[str]) -> tuple[dict[str, Any], float]:
    """Run ``ipdc mr`` as a user would; its summary and its wall time."""
    t0 = time.monotonic()
    done = run_cli(["mr", "--json", "--k", "3", "--chunks", "3", *args], node.home)
    result: dict[str, Any] = json.loads(done.stdout)
    return result, time.monotonic() - t0


def key_of(map_file: Path, data_file: Path) -> str:
    """The cache key of ``mr`` above: what a forger must target."""
    code = {"Map.py": cid_of_file(map_file), "Reduce.py": cid_of_file(JOBS_DIR / "Reduce.py")}
    stages = {"map": {"kind": "python", "file": "Map.py"}, "reduce": {"kind": "python", "file": "Reduce.py"}}
    return cache_key(code=code, stages=stages, input_cid=cid_of_file(data_file), input_name=data_file.name, k=3,
                     chunks=3, verify=1, majority=False)


def forge(member: Node, signer: Signer, key: str, result_cid: str) -> None:
    """Publish, from ``member``'s broker identity, a retained record of ``key`` signed by
    ``signer``, and wait until the broker holds it."""
    record = CacheRecord(key, Cid(result_cid), JobId.new(), NodeName(member.config.node.name), time.time())
    signed = signer.sign(record, CACHE.name, SWARM)
    topic = CACHE.topic(key=key, node=member.config.node.name)
    with SwarmClient(member.config, signer).connect() as client:
        client.bus.publish(topic, CACHE.encode(signed), retain=True)
        assert [m.payload for m in client.retained(topic)] == [CACHE.encode(signed)]


def bogus_result(member: Node) -> str:
    """A real, retrievable result directory with wrong counts."""
    with member.kubo() as kubo:
        part = kubo.add_bytes(b"the\t999999\n")
        return kubo.make_directory({"part-00000": part}, {"part-00000": len(b"the\t999999\n")})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with LocalCluster(3, base=tmp_path_factory.mktemp("cache")) as c:
        yield c


def test_an_identical_job_is_answered_from_the_cache_and_any_change_computes(cluster: LocalCluster,
                                                                             tmp_path: Path) -> None:
    node = cluster.nodes[0]
    slow, fast = tmp_path / "Slow.py", tmp_path / "Fast.py"
    slow.write_text(SLOW_MAP.format(delay="20"))
    fast.write_text(SLOW_MAP.format(delay="00"))  # one byte changed: "20" -> "00"
    assert len(slow.read_bytes()) == len(fast.read_bytes())
    data = make_input(tmp_path / "in.txt", 1)

    first, t_first = mr(node, ["--map", str(slow), str(tmp_path / "in.txt"), "-o", str(tmp_path / "o1")])
    assert first["cached"] is False and read_output(Path(first["output"]), 3)[0] == reference_counts(data)
    second, t_second = mr(node, ["--map", str(slow), str(tmp_path / "in.txt"), "-o", str(tmp_path / "o2")])
    print(f"first run {t_first:.2f} s, cached run {t_second:.2f} s ({100 * t_second / t_first:.1f} %)")
    assert second["cached"] is True and second["cached_from"] == first["job_id"]
    assert second["result_cid"] == first["result_cid"] and second["cache_key"] == first["cache_key"]
    assert t_second < 0.1 * t_first
    assert read_output(Path(second["output"]), 3)[0] == reference_counts(data)
    assert json.loads((Path(second["output"]) / "job.json").read_text())["cached"] is True
    row = History(node.home / DB_NAME).job(second["job_id"])
    assert row is not None and row["state"] == "succeeded" and row["summary"]["cached"] is True
    status = run_cli(["job", "status", second["job_id"]], node.home).stdout
    assert f"cached:  the result of job {first['job_id']}; no task ran" in status

    # One byte of Map.py: computed.
    changed_map, _ = mr(node, ["--map", str(fast), str(tmp_path / "in.txt"), "-o", str(tmp_path / "o3")])
    assert changed_map["cached"] is False and changed_map["cache_key"] != first["cache_key"]
    assert read_output(Path(changed_map["output"]), 3)[0] == reference_counts(data)

    # One byte of the input (Fast.py over in.txt is cached now): computed.
    other = bytearray(data)
    other[0] = ord("x") if other[0] != ord("x") else ord("y")
    (tmp_path / "in2.txt").write_bytes(other)
    changed_input, _ = mr(node, ["--map", str(fast), str(tmp_path / "in2.txt"), "-o", str(tmp_path / "o4")])
    assert changed_input["cached"] is False and changed_input["cache_key"] != changed_map["cache_key"]
    assert read_output(Path(changed_input["output"]), 3)[0] == reference_counts(bytes(other))

    # --no-cache computes what the cache holds, to the same result.
    again, _ = mr(node, ["--no-cache", "--map", str(fast), str(tmp_path / "in.txt"),
                         "-o", str(tmp_path / "o5")])
    assert again["cached"] is False and again["result_cid"] == changed_map["result_cid"]
    assert again["workers"]


def test_only_trusted_retrievable_records_are_used(cluster: LocalCluster, tmp_path: Path) -> None:
    node, member = cluster.nodes[0], cluster.nodes[1]
    fast = tmp_path / "Fast.py"
    fast.write_text(SLOW_MAP.format(delay="00"))
    wrong = bogus_result(member)
    log = node.home / "logs" / "control.log"

    # Signed by a key nobody trusts, published by a member: ignored, the job computes.
    data = make_input(tmp_path / "a.txt", 2)
    stranger = Signer.generate()
    forge(member, stranger, key_of(fast, tmp_path / "a.txt"), wrong)
    result, _ = mr(node, ["--map", str(fast), str(tmp_path / "a.txt"), "-o", str(tmp_path / "oa")])
    assert result["cached"] is False and result["cache_key"] == key_of(fast, tmp_path / "a.txt")
    assert read_output(Path(result["output"]), 3)[0] == reference_counts(data)
    assert f"signed by {stranger.public_key}, a key this node does not trust" in log.read_text()

    # Signed by a trusted member, naming a result no peer holds: ignored, the job computes.
    data = make_input(tmp_path / "b.txt", 3)
    nowhere = cid_of(b"a result that was never added anywhere\n")
    forge(member, member.signer, key_of(fast, tmp_path / "b.txt"), nowhere)
    result, _ = mr(node, ["--map", str(fast), str(tmp_path / "b.txt"), "-o", str(tmp_path / "ob")])
    assert result["cached"] is False
    assert read_output(Path(result["output"]), 3)[0] == reference_counts(data)
    assert f"result {nowhere}, not retrievable now" in log.read_text()

    # A member cannot put a record under another member's name: the broker's ACL drops it.
    make_input(tmp_path / "c.txt", 4)
    key = key_of(fast, tmp_path / "c.txt")
    record = CacheRecord(key, Cid(wrong), JobId.new(), NodeName(node.config.node.name), time.time())
    topic = CACHE.topic(key=key, node=node.config.node.name)
    with SwarmClient(member.config, member.signer).connect() as client:
        client.bus.publish(topic, CACHE.encode(member.signer.sign(record, CACHE.name, SWARM)), retain=True)
        assert client.retained(topic) == []

    # The control: the very record of the first case, signed by a trusted member's key on its
    # own topic, is used. What stopped it there was the signer alone.
    forge(member, member.signer, key, wrong)
    result, _ = mr(node, ["--map", str(fast), str(tmp_path / "c.txt"), "-o", str(tmp_path / "oc")])
    assert result["cached"] is True and result["result_cid"] == wrong
