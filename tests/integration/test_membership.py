"""Issue 10: the broker link is TLS with a certificate per node, and membership has a
lifecycle: single-use expiring invites, one live instance per identity, removal and
swarm-key rotation. Real mosquitto (with the ipdc_auth plugin), kubo and agents.

The module's swarm is made with the CLI, exactly as a user would: `deploy.py init` founds
it, `ipdc invite -o FILE` and `deploy.py init --join-file FILE` add a member. Every
command line on the machine is recorded while nodes are made and started, to show that
no secret ever passes through argv. Removal and rotation get a 4-node cluster of their
own (they take a member away for good).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ipdc import pki
from ipdc.bus import Bus, client_id, tls_context
from ipdc.config import BrokerSection, save_config
from ipdc.errors import BusError, IdentityRefused, KuboError
from ipdc.net import free_port
from ipdc.node.cluster import LocalCluster
from ipdc.node.invite import Invite
from ipdc.node.lifecycle import Node
from ipdc.spawn import wait_for
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import MapReduceController, MapReduceJob
from ipdc.wire.channel import MAX_PACKET
from ipdc.wire.download import DOWNLOAD, Download
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.manifest import JobManifest
from tests.helpers import ArgvWatch, mqtt_probe, read_output, reference_counts, run_cli

pytestmark = pytest.mark.timeout(300)

TEXT = b"alpha beta beta gamma gamma gamma\ndelta alpha\n" * 40


@dataclass
class Swarm:
    base: Path
    homes: list[Path]
    """Every home made here; all are stopped at the end."""
    argv: ArgvWatch
    tokens: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def founder(self) -> Node:
        return Node(self.homes[0])

    @property
    def member(self) -> Node:
        return Node(self.homes[1])

    def invite(self, name: str, *args: str) -> Path:
        """``ipdc invite -o FILE`` on the founder; the token is kept for the argv check, and what
        the command printed in :attr:`notes`."""
        token = self.base / f"{name}.token"
        self.notes[name] = run_cli(["invite", *args, "-o", str(token)], self.homes[0]).stderr
        self.tokens.append(token.read_text().strip())
        return token

    def join(self, name: str, token: Path, check: bool = True) -> tuple[Path, str]:
        """``deploy.py init --join-file`` (argv watched) in a fresh home; (home, stderr)."""
        home = self.base / name
        with self.argv:
            done = run_cli(["deploy.py", "init", "--host", "127.0.0.1", "--join-file", str(token)], home,
                           check=check)
        if done.returncode == 0:
            self.homes.append(home)
        return home, done.stderr

    def start(self, home: Path) -> None:
        with self.argv:
            run_cli(["deploy.py", "start"], home)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    base = tmp_path_factory.mktemp("membership")
    made = Swarm(base, [base / "founder"], ArgvWatch())
    try:
        with made.argv:
            run_cli(["deploy.py", "init", "--host", "127.0.0.1"], made.homes[0])
            run_cli(["deploy.py", "start"], made.homes[0])
        home, _ = made.join("member", made.invite("member"))
        made.start(home)
        yield made
    finally:
        for home in reversed(made.homes):
            run_cli(["deploy.py", "stop"], home, check=False)


def wordcount(submitter: Node, tmp_path: Path, k: int) -> list[str]:
    """Run WordCount on ``k`` workers from ``submitter``; assert exact counts; the workers."""
    (tmp_path / "in.txt").write_bytes(TEXT)
    job = MapReduceJob(input=tmp_path / "in.txt", k=k, output=tmp_path / "out")
    config = submitter.config
    with SwarmClient(config, submitter.signer).connect() as client, submitter.kubo() as kubo:
        result = MapReduceController(client, kubo, job, submitter.home).run()
    assert read_output(result.output, k)[0] == reference_counts(TEXT)
    return [w["name"] for w in result.workers]


def foreign_identity(directory: Path, cn: str) -> BrokerSection:
    """Credentials of another CA, for ``cn``: what an outsider could make for itself."""
    ca = pki.Authority.create("elsewhere")
    key = pki.new_key()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(pki.cert_pem(ca.cert))
    (directory / "x.crt").write_bytes(pki.cert_pem(ca.issue(cn, key.public_key())))
    (directory / "x.key").write_bytes(pki.key_pem(key))
    return BrokerSection(ca_file=str(directory / "ca.crt"), cert_file=str(directory / "x.crt"),
                         key_file=str(directory / "x.key"))


def test_the_broker_refuses_plaintext_and_foreign_certificates_at_the_handshake(swarm: Swarm,
                                                                                tmp_path: Path) -> None:
    cfg = swarm.founder.config
    host, port, victim = cfg.broker.host, cfg.broker.port, cfg.node.name
    trusting = ssl.create_default_context(cafile=cfg.broker.ca_file)  # verifies the broker, no client cert
    foreign = foreign_identity(tmp_path / "foreign", victim)  # another CA's certificate with the founder's CN
    with_foreign_cert = ssl.create_default_context(cafile=cfg.broker.ca_file)
    with_foreign_cert.load_cert_chain(foreign.cert_file, foreign.key_file)
    for what, context in (("plaintext", None), ("TLS without a certificate", trusting),
                          ("TLS with another CA's certificate", with_foreign_cert)):
        stage, detail = mqtt_probe(host, port, context, f"{victim}.agent")
        assert stage != "connack", f"{what}: the broker answered CONNECT ({detail})"
    # through IPDC's own client: refused before MQTT, not as an identity (that would be CONNACK 135)
    outsider = dataclasses.replace(foreign, host=host, port=port, ca_file=cfg.broker.ca_file)
    with pytest.raises(BusError, match=r"did not accept node .*certificate") as refused:
        Bus(outsider, f"{victim}.agent").connect(timeout=10)
    assert not isinstance(refused.value, IdentityRefused)
    # and a node trusts only its own swarm's CA: the real broker is refused with another CA pinned
    pinned_elsewhere = dataclasses.replace(swarm.member.config.broker, ca_file=foreign.ca_file)
    with pytest.raises(BusError, match="not this swarm's broker"):
        Bus(pinned_elsewhere, client_id(swarm.member.config.node.name, "test")).connect(timeout=10)
    assert swarm.founder.running() and swarm.member.running()


def test_a_member_cannot_use_another_nodes_client_id_and_the_victim_stays_connected(swarm: Swarm) -> None:
    victim_cfg, thief_cfg = swarm.founder.config, swarm.member.config
    victim_name = victim_cfg.node.name
    connections: list[float] = []
    victim = Bus(victim_cfg.broker, f"{victim_name}.victim", on_connected=lambda: connections.append(1))
    victim.subscribe(f"ipdc/peer/{victim_name}/probe")
    victim.connect()
    agent_log = swarm.homes[0] / "logs" / "agent.log"
    before = agent_log.read_text()
    try:
        for stolen in (f"{victim_name}.victim", f"{victim_name}.agent", victim_name):
            with pytest.raises(IdentityRefused, match=r"refused node .*identity"):
                Bus(thief_cfg.broker, stolen).connect(timeout=10)
        with Bus(thief_cfg.broker, client_id(thief_cfg.node.name, "test")) as sender:
            sender.connect()
            sender.publish(f"ipdc/peer/{victim_name}/probe", b"still here?")
        message = victim.inbox.get(timeout=10)
        assert message.payload == b"still here?" and victim.connected and len(connections) == 1
    finally:
        victim.close()
    assert "lost the broker" not in agent_log.read_text()[len(before):]
    log = (swarm.homes[0] / "logs" / "mosquitto.log").read_text()
    assert "ipdc_auth: refused client id" in log and "already connected, closing old connection" not in log


def test_an_oversize_message_is_refused_by_the_broker(swarm: Swarm) -> None:
    cfg = swarm.member.config
    with Bus(cfg.broker, client_id(cfg.node.name, "test")) as bus:
        bus.connect()
        with pytest.raises(BusError, match="max_packet_size"):
            bus.publish(f"ipdc/result/{cfg.node.name}/big", b"x" * MAX_PACKET)
    # a client that sends one anyway is disconnected by the broker (149 Packet too large)
    gone = threading.Event()
    reasons: list[int] = []
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id(cfg.node.name, "raw"),
                      protocol=mqtt.MQTTv5)
    raw.tls_set_context(tls_context(cfg.broker))
    raw.on_disconnect = lambda c, u, f, rc, p: (reasons.append(rc.value), gone.set())
    raw.connect(cfg.broker.host, cfg.broker.port)
    raw.loop_start()
    try:
        raw.publish(f"ipdc/result/{cfg.node.name}/big", b"x" * (MAX_PACKET + 1), qos=1)
        assert gone.wait(10), "the broker kept a client that sent a packet over max_packet_size"
    finally:
        raw.disconnect()
        raw.loop_stop()
    assert reasons[0] in (149, 128), reasons  # 128 when the client, still writing, sees only the reset
    assert "oversize packet" in (swarm.homes[0] / "logs" / "mosquitto.log").read_text()


def test_one_token_admits_one_node_and_the_second_join_fails_at_once(swarm: Swarm, tmp_path: Path) -> None:
    token = swarm.invite("once")
    first, said = swarm.join("first", token)
    fingerprint = re.search(r"swarm CA ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})", swarm.notes["once"])
    assert fingerprint and f"pinned the swarm's CA {fingerprint[1]}" in said, (swarm.notes["once"], said)
    swarm.start(first)
    started = time.monotonic()
    second, stderr = swarm.join("second", token, check=False)
    assert time.monotonic() - started < 30
    assert "already used" in stderr and "ipdc invite" in stderr, stderr
    assert not (second / "ipdc.conf").exists()
    # the first node keeps serving: a job on the three nodes, with it among the workers
    workers = wordcount(swarm.founder, tmp_path, 3)
    assert Node(first).config.node.name in workers


def test_an_expired_token_is_refused_here_and_by_the_broker(swarm: Swarm, tmp_path: Path) -> None:
    token = swarm.invite("short", "--ttl", "2s")
    invite = Invite.decode(token.read_text())
    assert wait_for(lambda: invite.expires().timestamp() < time.time() - 1, 10)
    home, stderr = swarm.join("late", token, check=False)
    assert "expired at" in stderr and "ipdc invite" in stderr, stderr
    assert not (home / "ipdc.conf").exists()
    # the broker refuses the expired enrollment certificate too, in TLS (no local check here)
    (tmp_path / "e.crt").write_text(invite.cert)
    (tmp_path / "e.key").write_text(invite.key)
    (tmp_path / "ca.crt").write_text(invite.ca)
    section = BrokerSection(host=invite.broker_host, port=invite.broker_port,
                            ca_file=str(tmp_path / "ca.crt"), cert_file=str(tmp_path / "e.crt"),
                            key_file=str(tmp_path / "e.key"))
    with pytest.raises(BusError, match="did not accept") as refused:
        Bus(section, invite.identity).connect(timeout=10)
    assert not isinstance(refused.value, IdentityRefused)


def _detach_copy(copy: Path) -> None:
    """A copy of a home on the same machine needs its own ports (as on another machine it
    would have them anyway); its kubo dials nobody, so the original's links are undisturbed."""
    node = Node(copy)
    cfg = node.config
    taken: set[int] = set()
    ports = {}
    for key in ("api_port", "swarm_port"):
        ports[key] = free_port("127.0.0.1", 0, taken)
        taken.add(ports[key])
    save_config(cfg.replace(kubo={**ports, "bootstrap": []}), node.conf_path)
    kubo_config = json.loads((copy / "kubo" / "config").read_text())
    kubo_config["Addresses"].update(API=f"/ip4/127.0.0.1/tcp/{ports['api_port']}",
                                    Swarm=[f"/ip4/127.0.0.1/tcp/{ports['swarm_port']}"])
    (copy / "kubo" / "config").write_text(json.dumps(kubo_config))
    for pid_file in (copy / "run").glob("*.pid"):
        pid_file.unlink()


def test_a_copied_home_refuses_to_start_and_names_the_host(swarm: Swarm) -> None:
    original = swarm.member
    name, agent = original.config.node.name, original.services["agent"].pid()
    copy = swarm.base / "copy"
    shutil.copytree(original.home, copy, ignore=shutil.ignore_patterns("*.sock", "repo.lock"))
    _detach_copy(copy)
    log = original.home / "logs" / "agent.log"
    before = log.read_text()
    try:
        done = run_cli(["deploy.py", "start"], copy, check=False)
    finally:
        run_cli(["deploy.py", "stop"], copy, check=False)
    assert done.returncode != 0
    where = f"node {name} is already live on host 127.0.0.1 ({socket.gethostname()})"
    assert where in done.stderr, done.stderr
    assert Node(copy).services["agent"].pid() is None
    assert original.services["agent"].pid() == agent
    assert "lost the broker" not in log.read_text()[len(before):]
    peers = {p["name"] for p in json.loads(run_cli(["peers", "--json"], swarm.homes[0]).stdout)}
    assert name in peers


def test_a_token_on_the_command_line_is_refused_with_what_to_use_instead(swarm: Swarm) -> None:
    token = swarm.invite("argv").read_text().strip()
    home = swarm.base / "argv"
    done = run_cli(["deploy.py", "init", "--join", token], home, check=False)
    assert done.returncode != 0 and not (home / "ipdc.conf").exists()
    assert "every user of this machine can read it" in done.stderr
    assert "--join-file FILE" in done.stderr and "--join -" in done.stderr
    # the same token through stdin is fine: it was never used
    done = run_cli(["deploy.py", "init", "--host", "127.0.0.1", "--join", "-"], home, input=token)
    swarm.homes.append(home)
    assert "joined the swarm" in done.stdout


def test_secrets_are_private_and_never_in_argv(swarm: Swarm) -> None:
    secrets: list[str] = []
    for token in swarm.tokens:
        secrets.append(token)
        secrets += _pem_lines(Invite.decode(token).key)
    for home in swarm.homes:
        assert stat.S_IMODE(home.stat().st_mode) == 0o700, home
        node = Node(home)
        private = [home / "ipdc.conf", home / "keys" / "node.key", home / "keys" / "submitter.key",
                   home / "kubo" / "swarm.key", home / "kubo" / "config"]  # (kubo's own peer key)
        if node.is_founder:
            private += [node.ca_key, home / "broker" / "broker.key", home / "broker" / "members.json"]
        for path in private:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            secrets += _pem_lines(path.read_text()) if path.suffix == ".key" else []
        secrets.append(node.swarm_key())
        secrets.append((home / "keys" / "submitter.key").read_text().strip().split(":", 1)[1])
    for token in swarm.base.glob("*.token"):
        assert stat.S_IMODE(token.stat().st_mode) == 0o600, token
    assert len(swarm.argv.seen) > 20  # the watch saw the commands it watched
    assert not swarm.argv.leaks(secrets)


def _pem_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM block: any of them in argv would leak part of the key."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


# -- removal and rotation: a cluster of their own ------------------------------------------
@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(4, base=tmp_path_factory.mktemp("removal")) as cluster:
        yield cluster


def test_a_removed_node_is_refused_everywhere_and_rotation_locks_it_out(four: LocalCluster,
                                                                        tmp_path: Path) -> None:
    founder, removed = four.nodes[0], four.nodes[3]
    remaining = four.nodes[:3]
    name, key = removed.config.node.name, removed.signer.public_key
    assert all(key in node.trust for node in remaining)
    with removed.kubo(timeout=30) as kubo:
        kubo.swarm_connect(remaining[1].swarm_multiaddr())  # before: the swarm key lets it in

    started = time.monotonic()
    run_cli(["node", "remove", name], founder.home)
    assert wait_for(lambda: all(key not in node.trust for node in remaining), 10)
    assert wait_for(lambda: not removed.running(), 10), "the removed node's agent is still running"
    assert time.monotonic() - started < 10
    assert "removed from the swarm" in (removed.home / "logs" / "agent.log").read_text()
    with pytest.raises(IdentityRefused, match="revoked"):
        SwarmClient(removed.config, removed.signer).connect()  # its jobs cannot even be submitted

    # its signed Download, delivered by any member, is refused by every node with a reason
    with founder.kubo() as kubo:
        code = {"Map.py": kubo.add_bytes(b"def map(line):\n    return []\n"),
                "Reduce.py": kubo.add_bytes(b"def reduce(key, values):\n    return 0\n")}
    job = JobId.new()
    with Bus(founder.config.broker, client_id(founder.config.node.name, "test")) as bus:
        bus.connect()
        for node in remaining:
            target = node.config.node.name
            manifest = JobManifest(job_id=job, owner=NodeName(name), code=code, chunks=[Cid(code["Map.py"])],
                                   partitions=1, workers=[NodeName(target)], submitter=key)
            signed = removed.signer.sign(Download(manifest), DOWNLOAD.name, target)
            bus.publish(DOWNLOAD.topic(node=target), DOWNLOAD.encode(signed))
    for node in remaining:
        log = node.home / "logs" / "agent.log"
        assert wait_for(lambda log=log: f"rejected download of job {job}: its submitter was removed from the "
                                        "swarm" in log.read_text(), 20), log.read_text()[-2000:]

    done = run_cli(["swarm", "rotate-key"], founder.home)
    match = re.search(r"(\d+) live member\(s\) switched in ([\d.]+) s", done.stdout)
    assert match and int(match[1]) == 3, done.stdout
    with removed.kubo(timeout=30) as kubo:
        for node in remaining:
            with pytest.raises(KuboError, match="failed to negotiate security protocol"):
                kubo.swarm_connect(node.swarm_multiaddr())
        assert not {n.peer_id() for n in remaining} & {a.rsplit("/p2p/", 1)[1] for a in kubo.swarm_peers()}
    assert all(node.swarm_key() == founder.swarm_key() != removed.swarm_key() for node in remaining)
    assert all(stat.S_IMODE((node.kubo_repo / "swarm.key").stat().st_mode) == 0o600 for node in remaining)
    assert sorted(wordcount(remaining[1], tmp_path, 3)) == sorted(n.config.node.name for n in remaining)
