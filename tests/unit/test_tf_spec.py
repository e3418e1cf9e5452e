"""Issue 4: the TF spec's validation, and how tasks are placed on peers (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipdc.errors import SpecError
from ipdc.peers import Peer, assign_nearest, select_nearest, xor_key
from ipdc.submit.tf import load_spec, make_cluster, parse_spec
from ipdc.wire.presence import Capabilities, Presence


def peer(name: str, tf: bool = True, slots: int = 2) -> Peer:
    return Peer(Presence(name=name, peer_id=f"12D3Koo-{name}", host="127.0.0.1", addrs=[],
                         caps=Capabilities(cores=2, mem_free_mb=8000, tf=tf), slots=slots,
                         load=0.0, ts=0.0))


def test_a_spec_comes_back_sorted_and_checked() -> None:
    assert parse_spec({"worker": [1, 0], "ps": [0], "chief": [0]}) == {
        "chief": [0], "ps": [0], "worker": [0, 1]}
    assert parse_spec({"local": [0, 1]}) == {"local": [0, 1]}


@pytest.mark.parametrize(("data", "names"), [
    ({"worker": [0, 2]}, "'worker'"),
    ({"worker": [0, 0]}, "'worker'"),
    ({"worker": "0,1"}, "'worker'"),
    ({"worker": []}, "'worker'"),
    ({"worker": [0, True]}, "'worker'"),
    ({"ps": [0], "Bad-Name": [0]}, "'Bad-Name'"),
    ({"chief": [0, 1]}, "'chief'"),
    ([0, 1], "mapping"),
    ({}, "mapping"),
    (None, "mapping"),
])
def test_a_malformed_spec_names_the_bad_key(data: object, names: str) -> None:
    with pytest.raises(SpecError, match=names):
        parse_spec(data, "spec.conf")


def test_load_spec_reads_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text("chief: [0]\nworker: [0, 1]\nps: [0]\n")
    (tmp_path / "b.json").write_text(json.dumps({"local": [0, 1]}))
    assert load_spec(tmp_path / "a.conf") == {"chief": [0], "ps": [0], "worker": [0, 1]}
    assert load_spec(tmp_path / "b.json") == {"local": [0, 1]}
    (tmp_path / "c.conf").write_text("worker: [0, 1\n")
    with pytest.raises(SpecError, match="c.conf"):
        load_spec(tmp_path / "c.conf")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.conf")


def test_one_task_per_peer_while_peers_last_nearest_first() -> None:
    peers = [peer(f"n{i}") for i in range(5)]
    chosen = assign_nearest(peers, "cluster", 3, lambda p: 2)
    assert chosen == select_nearest(peers, "cluster", 3)
    assert len({p.name for p in chosen}) == 3


def test_fewer_peers_than_tasks_wrap_around_within_capacity() -> None:
    peers = [peer(f"n{i}") for i in range(3)]
    order = select_nearest(peers, "k", 3)
    chosen = assign_nearest(peers, "k", 5, lambda p: 2)
    assert [p.name for p in chosen] == [p.name for p in order + order[:2]]
    assert len(assign_nearest(peers, "k", 7, lambda p: 2)) == 6  # capacity runs out
    one_slot = assign_nearest(peers, "k", 5, lambda p: 2 if p.name == order[2].name else 1)
    assert [p.name for p in one_slot] == [p.name for p in order] + [order[2].name]


def test_peers_without_tf_are_never_chosen() -> None:
    peers = [peer("a", tf=False), peer("b"), peer("c", tf=False), peer("d")]
    chosen = assign_nearest(peers, "x", 4, lambda p: 2, lambda p: p.presence.caps.tf)
    assert {p.name for p in chosen} == {"b", "d"}
    nearest_b = (xor_key(peers[1].peer_id) ^ xor_key("x")) < (xor_key(peers[3].peer_id) ^ xor_key("x"))
    assert chosen[0].name == ("b" if nearest_b else "d")


def test_the_cluster_spec_task_index_and_tf_configs_agree(tmp_path: Path) -> None:
    a, b = peer("a"), peer("b")
    cluster = make_cluster("demo", "0" * 32, tmp_path, [
        ("chief", 0, a, 5000), ("ps", 0, b, 5001), ("worker", 0, a, 5002), ("worker", 1, b, 5003)])
    spec = cluster.spec_file()
    assert spec["ClusterSpec"] == {"chief": ["127.0.0.1:5000"], "ps": ["127.0.0.1:5001"],
                                   "worker": ["127.0.0.1:5002", "127.0.0.1:5003"]}
    assert spec["TaskIndex"]["127.0.0.1:5003"] == ["worker", 1]
    config = json.loads(spec["TF_CONFIG"]["worker"][1])
    assert config == {"cluster": spec["ClusterSpec"], "task": {"type": "worker", "index": 1}}
    assert [t.server for t in cluster.tasks] == [False, True, True, True]
    assert cluster.command().startswith("TF_CONFIG=") and "example.py" in cluster.command()
