"""Worker choice by XOR distance, checked against a brute-force reference, and the
live-peer table that feeds it (driven by a fake clock, so no test sleeps)."""

from __future__ import annotations

import hashlib
import random

import pytest

from ipdc import peers as peers_module
from ipdc.peers import LivePeers, Peer, PeerTable, assign_nearest, select_nearest
from ipdc.wire.heartbeat import Heartbeat
from ipdc.wire.ids import NodeName
from ipdc.wire.presence import Capabilities, Presence


def presence(peer_id: str, name: str | None = None, tf: bool = False) -> Presence:
    return Presence(name=NodeName(name or f"n-{peer_id[-6:].lower()}"), peer_id=peer_id, host="127.0.0.1",
                    addrs=[], caps=Capabilities(cores=2, mem_free_mb=100, tf=tf), slots=2, load=0.0, ts=0.0)


def peer(peer_id: str, tf: bool = False) -> Peer:
    return Peer(presence(peer_id, tf=tf))


def h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def brute_force(peer_ids: list[str], key: str, k: int) -> list[str]:
    return sorted(peer_ids, key=lambda p: h(p) ^ h(key))[:k]


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def random_ids(rng: random.Random, n: int) -> list[str]:
    return [f"12D3KooW{rng.getrandbits(160):040x}" for _ in range(n)]


def test_matches_brute_force_for_many_keys() -> None:
    rng = random.Random(1)
    ids = random_ids(rng, 200)
    peers = [peer(i) for i in ids]
    for _ in range(50):
        key = f"{rng.getrandbits(128):032x}"
        for k in (1, 3, 10):
            assert [p.peer_id for p in select_nearest(peers, key, k)] == brute_force(ids, key, k)


def test_the_live_snapshot_matches_brute_force_for_every_k() -> None:
    rng = random.Random(2)
    ids = random_ids(rng, 300)
    table = PeerTable(timeout=10, clock=Clock())
    for i in ids:
        table.update_presence(f"n-{i[-8:]}", presence(i, f"n-{i[-8:]}"))
    live = table.live()
    assert isinstance(live, LivePeers) and len(live) == 300
    for _ in range(100):
        key = f"{rng.getrandbits(128):032x}"
        for k in (0, 1, 2, 3, 4, 16, 299, 300, 301):
            assert [p.peer_id for p in select_nearest(live, key, k)] == brute_force(ids, key, k)


def test_the_live_snapshot_matches_brute_force_with_a_filter() -> None:
    rng = random.Random(3)
    table = PeerTable(timeout=10, clock=Clock())
    tf_ids = []
    for n, i in enumerate(random_ids(rng, 400)):
        tf = n % 37 == 0  # rare, so the search widens its block many times
        table.update_presence(f"n-{n}", presence(i, f"n-{n}", tf=tf))
        tf_ids += [i] if tf else []
    live = table.live()
    for _ in range(50):
        key = f"{rng.getrandbits(128):032x}"
        for k in (1, 3, len(tf_ids), len(tf_ids) + 2):
            chosen = select_nearest(live, key, k, eligible=lambda p: p.presence.caps.tf)
            assert [p.peer_id for p in chosen] == brute_force(tf_ids, key, k)


def test_ineligible_peers_are_skipped_and_short_lists_returned() -> None:
    peers = [peer(f"id{i}", tf=i % 2 == 0) for i in range(6)]
    chosen = select_nearest(peers, "job", 10, eligible=lambda p: p.presence.caps.tf)
    assert len(chosen) == 3 and all(p.presence.caps.tf for p in chosen)


def test_assign_nearest_is_the_same_on_a_snapshot_and_on_a_list() -> None:
    rng = random.Random(4)
    table = PeerTable(timeout=10, clock=Clock())
    for n, i in enumerate(random_ids(rng, 50)):
        table.update_presence(f"n-{n}", presence(i, f"n-{n}", tf=n % 3 == 0))
    live = table.live()
    as_list = list(live)
    for key in ("a", "b", "c"):
        for tasks in (1, 5, 17, 40, 100):
            args = (key, tasks, lambda p: 1 + int(p.name[2:]) % 3, lambda p: p.presence.caps.tf)
            assert assign_nearest(live, *args) == assign_nearest(as_list, *args)


def test_peer_table_ages_and_goodbyes() -> None:
    table = PeerTable(timeout=5)
    p = peer("idA").presence
    table.update_presence(p.name, p, age=60)  # a retained presence a minute old
    assert table.live() == []
    table.update_presence(p.name, p)
    assert [x.name for x in table.live()] == [p.name]
    table.update_presence(p.name, None)  # last will or clean goodbye
    assert table.live() == []


def test_silence_past_the_timeout_drops_a_peer_and_a_heartbeat_brings_it_back() -> None:
    clock = Clock()
    table = PeerTable(timeout=5, clock=clock)
    a, b = presence("12D3KooWa"), presence("12D3KooWb")
    table.update_presence(a.name, a)
    clock.now += 3
    table.update_presence(b.name, b)
    clock.now += 2  # a is exactly at the timeout: still live
    assert {p.name for p in table.live()} == {a.name, b.name} and table.is_live(a.name)
    clock.now += 0.5
    assert [p.name for p in table.live()] == [b.name]
    assert not table.is_live(a.name) and table.is_live(b.name) and not table.is_live("n-unknown")
    table.update_heartbeat(Heartbeat(name=a.name, ts=0, load=0.5, running=1))
    assert {p.name for p in table.live()} == {a.name, b.name} and table.is_live(a.name)
    table.update_heartbeat(Heartbeat(name=b.name, ts=0, load=0, running=0), age=60)  # old news: no change
    clock.now += 4
    assert [p.name for p in table.live()] == [a.name]


def test_a_peer_goes_by_its_topic_name_whatever_its_presence_says() -> None:
    clock = Clock()
    table = PeerTable(timeout=5, clock=clock)
    table.update_presence("n-topic", presence("12D3KooWx", "n-payload"))
    assert len(table.live()) == 1 and table.is_live("n-topic") and not table.is_live("n-payload")
    clock.now += 6
    assert table.live() == [] and not table.is_live("n-topic")
    table.update_heartbeat(Heartbeat(name=NodeName("n-topic"), ts=0, load=0, running=0))
    assert len(table.live()) == 1
    table.update_presence("n-topic", None)
    assert table.live() == [] and not table.is_live("n-topic")


def test_refresh_all_keeps_peers_through_an_outage() -> None:
    clock = Clock()
    table = PeerTable(timeout=5, clock=clock)
    names = []
    for i in range(4):
        p = presence(f"12D3KooW{i}")
        table.update_presence(p.name, p)
        names.append(p.name)
    clock.now += 30  # the broker was away: no heartbeats for longer than the timeout
    table.refresh_all()
    for name in names[:2]:  # resubscribed: the broker sends the retained presences again
        table.update_presence(name, presence(f"12D3KooW{names.index(name)}"), age=30)
    assert sorted(p.name for p in table.live()) == sorted(names)
    assert all(table.is_live(n) for n in names)
    clock.now += 5
    table.update_heartbeat(Heartbeat(name=names[0], ts=0, load=0, running=0))
    clock.now += 1  # the others stayed silent for a whole timeout after the refresh
    assert [p.name for p in table.live()] == [names[0]]
    assert [n for n in names if table.is_live(n)] == [names[0]]


def test_the_snapshot_is_shared_until_the_live_set_changes_and_cannot_be_changed() -> None:
    clock = Clock()
    table = PeerTable(timeout=5, clock=clock)
    a, b = presence("12D3KooWa"), presence("12D3KooWb")
    table.update_presence(a.name, a)
    first = table.live()
    table.update_heartbeat(Heartbeat(name=a.name, ts=0, load=0.9, running=2))
    assert table.live() is first and first[0].load == 0.9
    table.update_presence(b.name, b)
    second = table.live()
    assert second is not first and len(second) == 2 and len(first) == 1
    with pytest.raises(TypeError):
        second.append(first[0])
    with pytest.raises(TypeError):
        second[0] = first[0]
    assert len(second) == 2


@pytest.mark.parametrize("rebuild_over", [peers_module.FULL_REBUILD_CHANGES, 0])
def test_random_churn_keeps_the_snapshot_exact(monkeypatch: pytest.MonkeyPatch, rebuild_over: int) -> None:
    """Joins, restarts, goodbyes, heartbeats (fresh and stale), silence and refreshes in
    random order; after each step the snapshot is checked against a plain model, and
    its choice against brute force. Both ways of updating the index are exercised:
    one change at a time, and a full sort after every change."""
    monkeypatch.setattr(peers_module, "FULL_REBUILD_CHANGES", rebuild_over)
    rng = random.Random(5)
    clock = Clock()
    timeout = 10.0
    table = PeerTable(timeout=timeout, clock=clock)
    ids = random_ids(rng, 60) + ["12D3KooWtwin"] * 2  # two nodes sharing one peer ID tie
    names = [f"n-{i}" for i in range(len(ids))]
    model: dict[str, tuple[str, float]] = {}  # name -> (peer ID, last heard)
    for step in range(1500):
        op = rng.random()
        n = rng.randrange(len(names))
        name = names[n]
        if op < 0.25:
            age = rng.choice([0.0, 0.0, 3.0, 30.0])
            table.update_presence(name, presence(ids[n], name), age=age)
            model[name] = (ids[n], max(model[name][1], clock.now - age) if name in model else clock.now - age)
        elif op < 0.35:
            table.update_presence(name, None)
            model.pop(name, None)
        elif op < 0.7:
            age = rng.choice([0.0, 0.0, 20.0])
            table.update_heartbeat(Heartbeat(name=NodeName(name), ts=0, load=0, running=0), age=age)
            if name in model:
                model[name] = (model[name][0], max(model[name][1], clock.now - age))
        elif op < 0.98:
            clock.now += rng.choice([0.5, 1.0, 2.5, 7.0])
        else:
            table.refresh_all()
            model = {nm: (pid, clock.now) for nm, (pid, _) in model.items()}
        if step % 3:
            continue
        live = table.live()
        expected = {nm for nm, (_, seen) in model.items() if clock.now - seen <= timeout}
        assert sorted(p.name for p in live) == sorted(expected)
        assert [p.point for p in live] == sorted(p.point for p in live)
        assert all(table.is_live(nm) == (nm in expected) for nm in names)
        key = f"{rng.getrandbits(64):016x}"
        for k in (1, 3, 8, len(live) + 1):
            chosen = select_nearest(live, key, k)
            assert chosen == sorted(list(live), key=lambda p: h(p.peer_id) ^ h(key))[:k]
            unique = [p.peer_id for p in live if p.peer_id != "12D3KooWtwin"]
            tf_free = select_nearest(live, key, k, eligible=lambda p: p.peer_id != "12D3KooWtwin")
            assert [p.peer_id for p in tf_free] == brute_force(unique, key, k)
