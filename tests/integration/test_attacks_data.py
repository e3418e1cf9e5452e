"""Attacks on a job's input and on the swarm's result cache, on the real 3-node swarm.

The attacker here is whoever made an input the user runs a job on (a shared data
directory, a CID someone published) or a swarm member publishing on MQTT. Each test
tries the attack through ``ipdc mr`` against real kubo, mosquitto and agents, and
asserts it fails safely: a clear error, and nothing read or uploaded that the user did
not name.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.kubo import KuboClient
from ipdc.node.cluster import LocalCluster
from ipdc.submit.inputs import MAX_DEPTH, MAX_ENTRIES, RESOLVE_TIMEOUT
from ipdc.submit.mapreduce import JOBS_DIR
from ipdc.wire.ids import Cid
from ipdc.wire.unixfs import cid_of, cid_of_file
from tests.helpers import cluster_as, read_output, reference_counts, run_cli
from tests.integration.test_cache import SLOW_MAP, bogus_result, forge, key_of, make_input, mr


def test_a_symlink_in_an_input_directory_uploads_nothing_it_points_at(swarm: LocalCluster, tmp_path: Path) -> None:
    """A data directory holding a link to the submitting node's own signing key: the job is
    refused, naming the link, and the key's bytes are in no node's kubo."""
    node = swarm.nodes[0]
    secret = next(p for p in (node.home / "keys").iterdir() if p.is_file())
    data = tmp_path / "shared-data"
    data.mkdir()
    (data / "words.txt").write_text("the cat sat\n")
    (data / "notes.txt").symlink_to(secret)
    done = run_cli(["mr", "--k", "2", str(data), "-o", str(tmp_path / "out")], node.home, check=False)
    assert done.returncode != 0
    assert f"symbolic link notes.txt -> {secret}; links inside an input are not followed" in done.stderr
    assert not (tmp_path / "out").exists()
    secret_cid = cid_of_file(secret)
    for member in swarm.nodes:
        with member.kubo() as kubo:
            assert secret_cid not in kubo.pins()
            assert secret_cid not in kubo._post("refs/local").text


def test_a_directory_dag_bomb_fails_at_once_with_the_bound(swarm: LocalCluster, tmp_path: Path) -> None:
    """A CID of four small directory blocks, each linking the next one 300 times (27 million
    paths): listing it stops at MAX_ENTRIES with an error saying why, each directory listed
    once, instead of walking for ever."""
    holder = swarm.nodes[2]
    with holder.kubo() as kubo:
        leaf = kubo.add_bytes(b"boom\n", "leaf.txt")
        child, size = leaf, 5
        for _ in range(3):
            names = {f"d{i:03d}": Cid(child) for i in range(300)}
            child = kubo.make_directory(names, dict.fromkeys(names, size))
            size = kubo.cumulative_size(child)
    done = run_cli(["mr", "--k", "2", str(child), "-o", str(tmp_path / "out")], swarm.nodes[0].home,
                   check=False, timeout=120)
    assert done.returncode != 0
    assert f"holds more than {MAX_ENTRIES} files and directories" in done.stderr


def test_a_directory_nested_past_the_bound_fails_with_the_bound(swarm: LocalCluster, tmp_path: Path) -> None:
    """A chain of MAX_DEPTH + 20 directories given by CID fails naming the depth bound (a
    walk without one recursed once per level)."""
    holder = swarm.nodes[2]
    with holder.kubo() as kubo:
        child, size = kubo.add_bytes(b"deep\n", "x.txt"), 5
        for _ in range(MAX_DEPTH + 20):
            child = kubo.make_directory({"d": Cid(child)}, {"d": size})
            size = kubo.cumulative_size(child)
    done = run_cli(["mr", "--k", "2", f"/ipfs/{child}", "-o", str(tmp_path / "out")], swarm.nodes[0].home,
                   check=False, timeout=120)
    assert done.returncode != 0
    assert f"nests directories more than {MAX_DEPTH} deep" in done.stderr


#: A job whose output depends on its input's name: lines per input file.
PATH_MAP = "def map(line, path):\n    yield path, 1\n"


def test_the_same_bytes_under_another_file_name_are_not_served_from_the_cache(swarm: LocalCluster,
                                                                              tmp_path: Path) -> None:
    """``map(line, path)`` gets a single-file input's own name, which the file's CID does not
    cover: the same bytes as ``b.txt`` after ``a.txt`` must count under ``b.txt``, not take
    the cached ``a.txt`` result. Both runs are exact against the line count."""
    node = swarm.nodes[0]
    (tmp_path / "Map.py").write_text(PATH_MAP)
    data = b"one line\n" * 120
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(data)
        done = run_cli(["mr", "--json", "--k", "1", "--map", str(tmp_path / "Map.py"), "--reduce",
                        str(JOBS_DIR / "Reduce.py"), str(tmp_path / name), "-o", str(tmp_path / f"out-{name}")],
                       node.home)
        summary = json.loads(done.stdout)
        assert summary["cached"] is False
        assert read_output(Path(summary["output"]), 1)[0] == Counter({name.encode(): 120})
    again = json.loads(run_cli(["mr", "--json", "--k", "1", "--map", str(tmp_path / "Map.py"), "--reduce",
                                str(JOBS_DIR / "Reduce.py"), str(tmp_path / "b.txt"), "-o",
                                str(tmp_path / "out-again")], node.home).stdout)
    assert again["cached"] is True and read_output(Path(again["output"]), 1)[0] == Counter({b"b.txt": 120})


def test_a_retained_record_of_a_key_no_longer_trusted_is_not_used(swarm: LocalCluster, tmp_path: Path) -> None:
    """A member's signed record stays retained on the broker after ``ipdc trust remove`` of
    its key: the next identical job computes (exact counts) and the log says why, on the
    running controller, with no restart. ``ipdc trust add`` makes it count again."""
    node, member = swarm.nodes[0], swarm.nodes[1]
    fast = tmp_path / "Fast.py"
    fast.write_text(SLOW_MAP.format(delay="00"))
    data = make_input(tmp_path / "in.txt", 21)
    wrong = bogus_result(member)
    forge(member, member.signer, key_of(fast, tmp_path / "in.txt"), wrong)
    args = ["--map", str(fast), str(tmp_path / "in.txt")]
    trusted, _ = mr(node, [*args, "-o", str(tmp_path / "o1")])
    assert trusted["cached"] is True and trusted["result_cid"] == wrong  # the control: the signer is trusted
    run_cli(["trust", "remove", member.signer.public_key], node.home)
    try:
        removed, _ = mr(node, [*args, "-o", str(tmp_path / "o2")])
        assert removed["cached"] is False
        assert read_output(Path(removed["output"]), 3)[0] == reference_counts(data)
        assert (f"signed by {member.signer.public_key}, a key this node does not trust"
                in (node.home / "logs" / "control.log").read_text())
    finally:
        run_cli(["trust", "add", member.signer.public_key], node.home)


def test_a_trusted_record_naming_a_dag_bomb_is_checked_in_bounds_and_the_job_computes(
        swarm: LocalCluster, tmp_path: Path) -> None:
    """A trusted member's record names a "result" of 61 blocks, each directory linking the next
    twice (2**60 paths). The retrievability check lists each block once (kubo's ``refs -r``
    without ``--unique`` lists one line per path: 2**17 - 2 of them already at 16 levels,
    read whole into the controller), the result, not being a directory of parts, is not
    written, and the job computes exact counts."""
    node, member = swarm.nodes[0], swarm.nodes[1]
    with member.kubo() as kubo:
        child = kubo.add_bytes(b"the\t1\n", "part")
        levels = []
        for _ in range(60):  # a link's size is only a hint: the true ones pass 2**63
            child = kubo.make_directory({"a": Cid(child), "b": Cid(child)}, {"a": 1, "b": 1})
            levels.append(child)
        assert len(kubo._post("refs", {"arg": levels[15], "recursive": "true"}).text.split()) == 2**17 - 2
    fast = tmp_path / "Fast.py"
    fast.write_text(SLOW_MAP.format(delay="00"))
    data = make_input(tmp_path / "in.txt", 23)
    forge(member, member.signer, key_of(fast, tmp_path / "in.txt"), child)
    result, _ = mr(node, ["--map", str(fast), str(tmp_path / "in.txt"), "-o", str(tmp_path / "out")])
    assert result["cached"] is False
    assert read_output(Path(result["output"]), 3)[0] == reference_counts(data)
    assert f"the cached result {child} of {member.config.node.name} was not written, so the job runs" in (
        node.home / "logs" / "control.log").read_text()


def test_hostile_ipfs_paths_fail_with_what_to_check(swarm: LocalCluster, tmp_path: Path) -> None:
    """``/ipfs/CID/../..`` climbs out of nothing (kubo refuses it), and a CID no live peer
    holds is waited for at most RESOLVE_TIMEOUT: both fail the job saying what to check."""
    node = swarm.nodes[0]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a b\n")
    with node.kubo() as kubo:
        root = kubo.make_directory({"docs": kubo.add_bytes(b"a b\n", "a.txt")}, {"docs": 4})
    nowhere = cid_of(b"an input that was never added anywhere\n")
    for ref in (f"/ipfs/{root}/../..", f"/ipfs/{root}/docs/../../../etc/passwd", nowhere):
        done = run_cli(["mr", "--k", "2", ref, "-o", str(tmp_path / "out")], node.home, check=False,
                       timeout=RESOLVE_TIMEOUT + 60)
        assert done.returncode != 0
        assert f"cannot read input {ref} from the swarm" in done.stderr, done.stderr
        assert "Is it added (`ipfs add -r`) on a live node, and the path inside it right?" in done.stderr
        assert not (tmp_path / "out").exists()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def file_of_one_block(kubo: KuboClient, block: Cid, size: int, times: int) -> Cid:
    """A UnixFS file of ``times`` x ``size`` bytes whose every leaf is the one ``block``: one
    small node over a block the swarm already holds."""
    data = b"\x08\x02" + b"\x18" + _varint(size * times) + (b"\x20" + _varint(size)) * times
    node = {"Data": {"/": {"bytes": base64.b64encode(data).decode().rstrip("=")}},
            "Links": [{"Hash": {"/": str(block)}, "Name": "", "Tsize": size}] * times}
    answer = kubo._post("dag/put", {"store-codec": "dag-pb", "input-codec": "dag-json", "pin": "true"},
                        files={"file": ("node", json.dumps(node).encode())}).json()
    return Cid(answer["Cid"]["/"])


@pytest.fixture(scope="module")
def small_files() -> Iterator[LocalCluster]:
    """Two nodes whose sandboxes hold files of at most 32 MB (sandbox.file_mb)."""
    with cluster_as(None, "ipdc-attack-data-", {"file_mb": 32, "task_timeout": 120.0}) as cluster:
        yield cluster


def test_a_file_of_one_block_linked_a_thousand_times_is_not_read_past_file_mb(small_files: LocalCluster,
                                                                            tmp_path: Path) -> None:
    """A 1 GB input file made of one 1 MiB block (two blocks in kubo) given by CID: every map
    task's chunk (512 MB) is refused by the agent before it reads it, naming the limit (the
    agent held each chunk whole in its own memory, outside any sandbox); the agents live on
    and the next job is exact."""
    node, holder = small_files.nodes[0], small_files.nodes[1]
    text = b"the cat sat\n" * ((1 << 20) // 12)
    with holder.kubo() as kubo:
        block = kubo.add_bytes(text, "block.txt")
        big = file_of_one_block(kubo, block, len(text), 1024)
        assert kubo.stat(big, 10) == ("file", len(text) * 1024)
    done = run_cli(["mr", "--k", "2", "--chunks", "2", "--max-attempts", "1", str(big), "-o", str(tmp_path / "o")],
                   node.home, check=False)
    assert done.returncode != 0
    assert "more than sandbox.file_mb = 32 MB: give the job more --chunks" in done.stderr, done.stderr
    (tmp_path / "in.txt").write_bytes(text)
    after = json.loads(run_cli(["mr", "--json", "--k", "2", str(tmp_path / "in.txt"), "-o", str(tmp_path / "ok")],
                               node.home).stdout)
    assert read_output(Path(after["output"]), 2)[0] == reference_counts(text)
