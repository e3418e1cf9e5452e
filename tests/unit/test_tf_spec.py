"""The TF spec's validation, how tasks are placed on peers, and the plan every host derives its part
from (pure functions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipdc.errors import MessageError, SpecError
from ipdc.peers import Peer, assign_nearest, select_nearest, xor_key
from ipdc.submit.tf import TfCluster, load_spec, parse_spec
from ipdc.wire.ids import NodeName
from ipdc.wire.presence import Capabilities, Presence
from ipdc.wire.tf import TfPlan, base_port, cluster_token, protocol


def peer(name: str, tf: bool = True, slots: int = 2) -> Peer:
    return Peer(Presence(name=NodeName(name), peer_id=f"12D3Koo-{name}", host="127.0.0.1", addrs=[],
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
    ({"chief": [0]}, "no server task"),
    ({"worker": list(range(65))}, "at most 64"),
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
    with pytest.raises(SpecError, match=r"c\.conf"):
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


PEER_A = "12D3KooW" + "A" * 44
PEER_B = "12D3KooW" + "B" * 44


def plan(**changes: object) -> TfPlan:
    fields: dict[str, object] = {
        "name": "demo", "tasks": {"chief": ["a"], "ps": ["b"], "worker": ["a", "b"]},
        "peers": {"a": PEER_A, "b": PEER_B}, "base_port": base_port(cluster_token("key", "0" * 32))}
    return TfPlan.from_params({**fields, **changes})


def test_every_host_derives_the_same_loopback_cluster_from_the_plan() -> None:
    p = plan()
    base = p.base_port
    assert p.cluster_spec() == {"chief": [f"127.0.0.1:{base}"], "ps": [f"127.0.0.1:{base + 1}"],
                                "worker": [f"127.0.0.1:{base + 2}", f"127.0.0.1:{base + 3}"]}
    assert [(t.name, t.host, t.sock, t.server) for t in p.task_list()] == [
        ("chief-0", "a", "t0.sock", False), ("ps-0", "b", "t1.sock", True),
        ("worker-0", "a", "t2.sock", True), ("worker-1", "b", "t3.sock", True)]
    assert [t.name for t in p.servers()] == ["ps-0", "worker-0", "worker-1"]
    assert TfPlan.from_params(p.to_params()) == p
    token = cluster_token("key", "0" * 32)
    assert protocol(token, p.servers()[0]) == f"/x/ipdc-tf/{token}/t1"
    assert cluster_token("other key", "0" * 32) != token  # two submitters' clusters never share sockets


def test_a_cluster_record_offers_the_chiefs_command_and_tf_config(tmp_path: Path) -> None:
    p = plan()
    cluster = TfCluster("demo", "0" * 32, "key", p.to_params(), str(tmp_path))
    assert cluster.tf_config() == {"cluster": p.cluster_spec(), "task": {"type": "chief", "index": 0}}
    assert cluster.command().startswith("ipdc tf run demo -- python ") and "example.py" in cluster.command()
    rows = cluster.to_dict()["tasks"]
    assert [(r["job"], r["peer"], r["server"]) for r in rows][:2] == [("chief", "a", False),
                                                                      ("ps", "b", True)]


@pytest.mark.parametrize(("changes", "names"), [
    ({"tasks": {"worker": ["c"]}}, "no peer ID"),
    ({"tasks": {"chief": ["a", "b"]}}, "'chief' has 2 tasks"),
    ({"tasks": {"Worker": ["a"]}}, "not a TF job name"),
    ({"tasks": {"worker": ["a"] * 65}}, "out of range"),
    ({"tasks": {}}, "out of range"),
    ({"peers": {"a": "not-a-peer", "b": PEER_B}}, "not a kubo peer ID"),
    ({"peers": {"a": PEER_A, "b": PEER_A}}, "two nodes claim one peer ID"),
    ({"peers": {"../a": PEER_A, "b": PEER_B}}, "node name"),
    ({"base_port": 80}, "base port"),
    ({"code": "import os"}, "unknown key"),
])
def test_a_malformed_plan_is_refused_by_name(changes: dict[str, object], names: str) -> None:
    with pytest.raises(MessageError, match=names):
        plan(**changes)
