"""Issue 2: real nodes made with deploy.py: a private kubo swarm, mosquitto, agents.

Node 1 is created with `deploy.py init`; nodes 2 and 3 join with `init --join-file`
and an invite token from `ipdc invite -o FILE` on node 1, exactly as a user would type it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.bus import Bus, client_id
from ipdc.config import load_config
from ipdc.errors import KuboError
from ipdc.kubo import KuboClient
from ipdc.node.lifecycle import Node
from ipdc.spawn import pid_alive, wait_for
from ipdc.wire.channel import MAX_PAYLOAD
from ipdc.wire.inbox import INBOX_CHANNELS
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    base = tmp_path_factory.mktemp("deploy")
    homes = [base / f"node{i}" for i in (1, 2, 3)]
    try:
        run_cli(["deploy.py", "init", "--host", "127.0.0.1"], homes[0])
        run_cli(["deploy.py", "start"], homes[0])
        for home in homes[1:]:
            token = base / f"{home.name}.token"
            run_cli(["invite", "-o", str(token)], homes[0])
            run_cli(["deploy.py", "init", "--host", "127.0.0.1", "--join-file", str(token)], home)
            run_cli(["deploy.py", "start"], home)
        yield homes
    finally:
        for home in reversed(homes):
            if home.exists():
                run_cli(["deploy.py", "stop"], home, check=False)


def peer_names(home: Path) -> set[str]:
    return {p["name"] for p in json.loads(run_cli(["peers", "--json"], home).stdout)}


def test_all_three_nodes_list_each_other(homes: list[Path]) -> None:
    names = {load_config(h / "ipdc.conf").node.name for h in homes}
    assert len(names) == 3
    for home in homes:
        assert wait_for(lambda home=home: peer_names(home) == names, 20, 0.5), peer_names(home)
    rows = json.loads(run_cli(["peers", "--json"], homes[2]).stdout)
    for row in rows:
        assert row["peer_id"].startswith("12D3KooW") and row["cores"] >= 1
        assert row["last_seen_s"] < 10


def test_file_added_on_node1_is_read_by_cid_on_node3(homes: list[Path]) -> None:
    n1, n3 = Node(homes[0]), Node(homes[2])
    assert n1.kubo_repo != n3.kubo_repo and n1.peer_id() != n3.peer_id()
    payload = secrets.token_bytes(700_000)  # several blocks, unique to this run
    with n1.kubo() as k1, n3.kubo(timeout=30) as k3:
        cid = k1.add_bytes(payload)
        assert k3.cat(cid) == payload


def _kubo_outsider(tmp: Path, binary: str, swarm_key: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "IPFS_PATH": str(tmp), "IPFS_TELEMETRY": "off"}
    subprocess.run([binary, "init", "--empty-repo", "--profile=test"], env=env, check=True,
                   capture_output=True)
    if swarm_key:
        (tmp / "swarm.key").write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{swarm_key}\n")
        env["LIBP2P_FORCE_PNET"] = "1"
    config = json.loads((tmp / "config").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config["Addresses"]["API"] = f"/ip4/127.0.0.1/tcp/{port}"
    config["Plugins"] = {"Plugins": {"telemetry": {"Config": {"Mode": "off"}}}}
    (tmp / "config").write_text(json.dumps(config))
    proc = subprocess.Popen([binary, "daemon"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    proc.api = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return proc


@pytest.mark.parametrize("key", ["other-key", "no-key"])
def test_kubo_without_the_swarm_key_cannot_connect(homes: list[Path], tmp_path: Path, key: str) -> None:
    n1 = Node(homes[0])
    outsider = _kubo_outsider(tmp_path / "kubo", n1.config.kubo.binary,
                              secrets.token_hex(32) if key == "other-key" else None)
    try:
        with KuboClient(outsider.api, timeout=10) as kubo:  # type: ignore[attr-defined]
            def up() -> bool:
                try:
                    kubo.id()
                    return True
                except KuboError:
                    return False
            assert wait_for(up, 30, 0.2)
            with pytest.raises(KuboError):
                kubo.swarm_connect(n1.swarm_multiaddr())
            assert n1.peer_id() not in " ".join(kubo.swarm_peers())
    finally:
        outsider.terminate()
        outsider.wait(10)


def test_init_twice_changes_nothing(homes: list[Path]) -> None:
    home = homes[1]
    files = (home / "ipdc.conf", home / "kubo" / "config", home / "kubo" / "swarm.key")
    before = {p: p.read_bytes() for p in files}
    out = run_cli(["deploy.py", "init", "--host", "127.0.0.1"], home).stdout
    assert "already initialised" in out and "nothing changed" in out
    assert {p: p.read_bytes() for p in before} == before


def test_start_refuses_when_running_or_port_taken(homes: list[Path], tmp_path: Path) -> None:
    done = run_cli(["deploy.py", "start"], homes[1], check=False)
    assert done.returncode != 0 and "already running" in done.stderr
    fresh = tmp_path / "fresh"
    run_cli(["deploy.py", "init", "--host", "127.0.0.1"], fresh)
    api_port = load_config(fresh / "ipdc.conf").kubo.api_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", api_port))
        squatter.listen()
        done = run_cli(["deploy.py", "start"], fresh, check=False)
    assert done.returncode != 0
    assert f"127.0.0.1:{api_port}" in done.stderr and "kubo.api_port" in done.stderr
    assert Node(fresh).status() and not any(s.pid for s in Node(fresh).status())


def test_start_after_an_agent_crash_restarts_only_the_agent(homes: list[Path]) -> None:
    node = Node(homes[2])
    agent, kubo = node.services["agent"].pid(), node.services["ipfs"].pid()
    assert agent and kubo
    os.kill(agent, signal.SIGKILL)
    assert wait_for(lambda: node.services["agent"].pid() is None, 10)
    run_cli(["deploy.py", "start"], homes[2])
    assert node.services["ipfs"].pid() == kubo
    assert node.services["agent"].pid() not in (None, agent)
    assert wait_for(lambda: load_config(homes[2] / "ipdc.conf").node.name in peer_names(homes[0]), 20)


def test_garbage_on_every_channel_leaves_the_agent_running(homes: list[Path]) -> None:
    target = Node(homes[1]).config
    sender = Node(homes[0]).config
    log_file = homes[1] / "logs" / "agent.log"
    before = log_file.read_text().count("dropped")
    garbage = [b"", b"\xff\xfe", b"{not json", b"[]", b'{"job_id": 5}', b"x" * (MAX_PAYLOAD + 1)]
    topics = [f"ipdc/peer/{target.node.name}/{name}" for name in INBOX_CHANNELS] + \
             [f"ipdc/peer/{target.node.name}/no-such-channel"]
    with Bus(sender.broker, client_id(sender.node.name, "fuzz")) as bus:
        bus.connect()
        for topic in topics:
            for payload in garbage:
                bus.publish(topic, payload)
    expected = before + len(topics) * len(garbage)
    assert wait_for(lambda: log_file.read_text().count("dropped") >= expected, 30, 0.2), \
        log_file.read_text()[-3000:]
    assert Node(homes[1]).running()
    assert target.node.name in peer_names(homes[0])


def test_stop_leaves_no_process_and_restart_keeps_peer_id(homes: list[Path]) -> None:
    node = Node(homes[2])
    peer_id = node.peer_id()
    pids = [s.pid for s in node.status() if s.pid]
    assert len(pids) == 3  # kubo, agent and the controller service; node 3 does not host the broker
    children = _descendants(pids)
    run_cli(["deploy.py", "stop"], homes[2])
    assert not [p for p in pids + children if pid_alive(p)]
    assert not list((homes[2] / "run").glob("*.pid"))
    run_cli(["deploy.py", "start"], homes[2])
    assert node.peer_id() == peer_id
    name = node.config.node.name
    assert wait_for(lambda: name in peer_names(homes[0]), 20, 0.5)
    status = run_cli(["status"], homes[2]).stdout
    assert "running" in status and peer_id in status


def _descendants(pids: list[int]) -> list[int]:
    """Every process whose parent chain reaches one of ``pids`` (e.g. warm runners)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
    found, frontier = [], set(pids)
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        found += frontier
    return found


def test_invite_on_a_node_without_the_broker_says_where_to_run_it(homes: list[Path]) -> None:
    done = run_cli(["invite"], homes[1], check=False)
    assert done.returncode != 0 and "broker host" in done.stderr


def test_peers_clean_goodbye_removes_presence(homes: list[Path]) -> None:
    name = load_config(homes[2] / "ipdc.conf").node.name
    run_cli(["deploy.py", "stop"], homes[2])
    try:
        assert wait_for(lambda: name not in peer_names(homes[0]), 20, 0.5)
    finally:
        run_cli(["deploy.py", "start"], homes[2])
    assert name in peer_names(homes[0])
