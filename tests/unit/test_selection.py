"""Worker choice by XOR distance, checked against a brute-force reference."""

from __future__ import annotations

import hashlib
import random

from channels.presence import Capabilities, Presence
from ipdc.peers import Peer, PeerTable, select_nearest


def peer(peer_id: str, tf: bool = False) -> Peer:
    return Peer(Presence(name=f"n-{peer_id[-6:].lower()}", peer_id=peer_id, host="127.0.0.1", addrs=[],
                         caps=Capabilities(cores=2, mem_free_mb=100, tf=tf), slots=2, load=0.0, ts=0.0))


def brute_force(peer_ids: list[str], key: str, k: int) -> list[str]:
    h = lambda s: int(hashlib.sha256(s.encode()).hexdigest(), 16)  # noqa: E731
    return sorted(peer_ids, key=lambda p: h(p) ^ h(key))[:k]


def test_matches_brute_force_for_many_keys() -> None:
    rng = random.Random(1)
    ids = [f"12D3KooW{rng.getrandbits(160):040x}" for _ in range(200)]
    peers = [peer(i) for i in ids]
    for _ in range(50):
        key = f"{rng.getrandbits(128):032x}"
        for k in (1, 3, 10):
            assert [p.peer_id for p in select_nearest(peers, key, k)] == brute_force(ids, key, k)


def test_ineligible_peers_are_skipped_and_short_lists_returned() -> None:
    peers = [peer(f"id{i}", tf=i % 2 == 0) for i in range(6)]
    chosen = select_nearest(peers, "job", 10, eligible=lambda p: p.presence.caps.tf)
    assert len(chosen) == 3 and all(p.presence.caps.tf for p in chosen)


def test_peer_table_ages_and_goodbyes() -> None:
    table = PeerTable(timeout=5)
    p = peer("idA").presence
    table.update_presence(p.name, p, age=60)  # a retained presence a minute old
    assert table.live() == []
    table.update_presence(p.name, p)
    assert [x.name for x in table.live()] == [p.name]
    table.update_presence(p.name, None)  # last will or clean goodbye
    assert table.live() == []
