"""A node's lifecycle: init (found or join a swarm), invite, start, stop, status.

The files it creates are described in :mod:`ipdc.home`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ipdc.bus import Bus
from ipdc.config import BrokerSection, Config, KuboSection, NodeSection, save_config
from ipdc.errors import KuboError, NodeError
from ipdc.home import NodeHome
from ipdc.isolation import interpreter
from ipdc.net import free_port, port_in_use, port_open
from ipdc.node.broker import Broker
from ipdc.node.install import ensure_kubo, ensure_mosquitto, find_mosquitto
from ipdc.node.invite import Invite
from ipdc.spawn import PACKAGE, Service, wait_for
from ipdc.wire.ids import NodeName
from ipdc.wire.presence import PRESENCE

log = logging.getLogger(__name__)

SERVICES = ("mosquitto", "ipfs", "agent")


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    address: str

    @property
    def state(self) -> str:
        return "running" if self.pid else "stopped"


def new_node_name() -> NodeName:
    return NodeName(f"n-{secrets.token_hex(4)}")


class Node(NodeHome):
    """The node whose state lives in ``home``, with its services."""

    def __init__(self, home: Path | None = None, user: str | None = None) -> None:
        """``user``: run the agent as that user (started by root; see LocalCluster's ``user``)."""
        super().__init__(home)
        self.user = user
        self.services = {name: Service(self.home, name) for name in SERVICES}

    def running(self) -> bool:
        return self.services["agent"].pid() is not None

    # -- init ------------------------------------------------------------------------
    def init(self, host: str = "127.0.0.1", join: Invite | None = None, slots: int = 0,
             ports: dict[str, int] | None = None) -> str:
        """Create the node. Idempotent: on an initialised home it changes nothing."""
        if self.initialised:
            return (f"{self.home} is already initialised (node {self.config.node.name}, "
                    f"peer {self.peer_id()}); nothing changed")
        kubo_binary = ensure_kubo()
        hosted = join is None
        passwd_binary = ensure_mosquitto()[1] if hosted else None
        taken: set[int] = set()
        wanted = {"broker": 1883, "api": 5001, "swarm": 4001, **(ports or {})}
        chosen = {}
        for key, preferred in wanted.items():
            bind = "127.0.0.1" if key == "api" else host
            chosen[key] = free_port(bind, preferred, taken)
            taken.add(chosen[key])

        self.home.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "run", "work", "keys"):
            (self.home / sub).mkdir(exist_ok=True)
        swarm_key = join.swarm_key if join else secrets.token_hex(32)
        bootstrap = join.bootstrap if join else []
        self._init_kubo(kubo_binary, swarm_key, host, chosen, bootstrap)

        if join is None:
            name, password = new_node_name(), secrets.token_urlsafe(24)
            broker = BrokerSection(host=host, port=chosen["broker"], username=name,
                                   password=password, hosted=True)
            Broker(self.home).write_config(host, chosen["broker"])
            assert passwd_binary is not None
            Broker(self.home).add_user(passwd_binary, name, password)
        else:
            broker = BrokerSection(host=join.broker_host, port=join.broker_port,
                                   username=join.username, password=join.password, hosted=False)
        cfg = Config(
            node=NodeSection(name=broker.username, host=host, slots=slots),
            broker=broker,
            kubo=KuboSection(binary=str(kubo_binary), api_port=chosen["api"], swarm_port=chosen["swarm"],
                             bootstrap=bootstrap),
        )
        save_config(cfg, self.conf_path)
        self._config = cfg
        self.trust.add(self.signer.public_key, f"{cfg.node.name} (this node)")
        for key in join.trusted if join else []:
            self.trust.add(key, "from the invite")
        role = "joined the swarm" if join else "founded a new private swarm (this node hosts the broker)"
        return f"initialised {self.home}: node {cfg.node.name}, peer {self.peer_id()}, {role}"

    def _init_kubo(self, binary: Path, swarm_key: str, host: str, ports: dict[str, int],
                   bootstrap: list[str]) -> None:
        done = subprocess.run([str(binary), "init", "--empty-repo", "--profile=test"],
                              env=self.kubo_env(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NodeError(f"`ipfs init` failed in {self.kubo_repo}: {done.stderr.strip()}")
        key_file = self.kubo_repo / "swarm.key"
        key_file.write_text(f"/key/swarm/psk/1.0.0/\n/base16/\n{swarm_key}\n")
        key_file.chmod(0o600)
        config_file = self.kubo_repo / "config"
        kc = json.loads(config_file.read_text())
        # The gateway is off: IPDC does not use it, and any local user could read any CID through it.
        kc["Addresses"].update(API=f"/ip4/127.0.0.1/tcp/{ports['api']}", Gateway=[],
                               Swarm=[f"/ip4/{host}/tcp/{ports['swarm']}"])
        # The RPC API is an admin interface: only requests with the node's secret are served.
        kc.setdefault("API", {})["Authorizations"] = {
            "ipdc": {"AuthSecret": f"bearer:{self._new_kubo_secret()}", "AllowedPaths": ["/api/v0"]}}
        # Peers are dialled by IPDC once the daemon is ready (see Node.connect_swarm), not by
        # kubo's Bootstrap or Peering: those dial during start-up, before bitswap listens for
        # new connections, and bitswap then never sends wants to that peer.
        kc["Bootstrap"] = []
        kc["Peering"] = {"Peers": []}
        kc["Plugins"] = {"Plugins": {"telemetry": {"Config": {"Mode": "off"}}}}
        kc["Discovery"] = {"MDNS": {"Enabled": False}}
        kc["AutoConf"] = {"Enabled": False}
        kc["AutoTLS"] = {"Enabled": False}
        kc["Import"].update(CidVersion=1, UnixFSRawLeaves=True, HashFunction="sha2-256",
                            UnixFSChunker="size-262144")
        # A private swarm is small and every member may hold a block: ask all connected
        # peers (kubo < 0.36 behaviour). Broadcast control could skip a freshly connected peer.
        kc.setdefault("Internal", {})["Bitswap"] = {"BroadcastControl": {"Enable": False}}
        kc["Routing"]["Type"] = "dht"
        # TF streams between cluster hosts ride the private swarm (`p2p listen/forward`, ipdc.wire.tf).
        kc.setdefault("Experimental", {})["Libp2pStreamMounting"] = True
        # A private network is TCP only.
        kc["Swarm"]["Transports"]["Network"] = {
            "QUIC": False, "WebTransport": False, "WebRTCDirect": False, "Websocket": False,
        }
        config_file.write_text(json.dumps(kc, indent=2))

    def _new_kubo_secret(self) -> str:
        """A fresh API secret in a file only this user can read (O_EXCL: never one that existed)."""
        secret = secrets.token_urlsafe(32)
        fd = os.open(self.kubo_secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return secret

    # -- invite ----------------------------------------------------------------------
    def invite(self) -> str:
        """Mint credentials for one new node and return its invite token."""
        cfg = self.config
        if not cfg.broker.hosted:
            raise NodeError(
                f"node {cfg.node.name} does not host the broker, so it cannot create broker "
                f"credentials: run `ipdc invite` on the broker host ({cfg.broker.host})"
            )
        found = find_mosquitto()
        if found is None:
            raise NodeError("mosquitto_passwd is missing: run `python deploy.py init` again")
        name, password = new_node_name(), secrets.token_urlsafe(24)
        broker = Broker(self.home)
        broker.add_user(found[1], name, password)
        if (pid := self.services["mosquitto"].pid()) is not None:
            broker.reload(pid)
        return Invite(
            swarm_key=(self.kubo_repo / "swarm.key").read_text().split()[-1],
            broker_host=cfg.broker.host, broker_port=cfg.broker.port,
            username=name, password=password,
            bootstrap=[self.swarm_multiaddr()],
            trusted=list(self.trust.keys()),
        ).encode()

    # -- start / stop / status -------------------------------------------------------
    def start(self, timeout: float = 60.0) -> list[ServiceStatus]:
        """Start the node's services that are not running: after a crash of one (say the
        agent), ``start`` brings back just that one."""
        cfg = self.config
        wanted = [n for n in SERVICES if n != "mosquitto" or cfg.broker.hosted]
        down = [n for n in wanted if self.services[n].pid() is None]
        if not down:
            raise NodeError(f"node {self.home} is already running ({', '.join(wanted)}); "
                            "stop it first with `python deploy.py stop`")
        self._check_ports(cfg, down)
        starters = {"mosquitto": self._start_broker, "ipfs": self._start_kubo, "agent": self._start_agent}
        for name in down:
            starters[name](cfg, timeout)
        return self.status()

    def _check_ports(self, cfg: Config, services: list[str]) -> None:
        checks = {"ipfs": [("127.0.0.1", cfg.kubo.api_port, "kubo.api_port"),
                           (cfg.node.host, cfg.kubo.swarm_port, "kubo.swarm_port")],
                  "mosquitto": [(cfg.node.host, cfg.broker.port, "broker.port")]}
        for host, port, key in [c for name in services for c in checks.get(name, [])]:
            if port_in_use(host, port):
                raise NodeError(f"port {host}:{port} ({key} in {self.conf_path}) is taken by another "
                                "process: stop that process or change the port, then start again")

    def _start_broker(self, cfg: Config, timeout: float) -> None:
        found = ensure_mosquitto()
        service = self.services["mosquitto"]
        service.start([str(found[0]), "-c", str(Broker(self.home).conf)])
        if not wait_for(lambda: port_open(cfg.broker.host, cfg.broker.port) or service.pid() is None,
                        timeout) \
                or service.pid() is None:
            raise service.fail(f"did not open {cfg.broker.host}:{cfg.broker.port}")

    def _start_kubo(self, cfg: Config, timeout: float) -> None:
        service = self.services["ipfs"]
        service.start([cfg.kubo.binary, "daemon", "--migrate=false"], env=self.kubo_env())
        with self.kubo(timeout=5) as kubo:
            def healthy() -> bool:
                try:
                    kubo.id()
                    return True
                except KuboError:
                    return service.pid() is None
            if not wait_for(healthy, timeout, 0.1) or service.pid() is None:
                raise service.fail(f"did not answer on {cfg.kubo_api_url}")
            self.connect_swarm(kubo)

    def _start_agent(self, cfg: Config, timeout: float) -> None:
        service = self.services["agent"]
        env = {**os.environ, "IPDC_HOME": str(self.home)}
        argv = [sys.executable, "-m", "ipdc.agent"]
        if self.user is not None:  # a Python, and this ipdc, that the user can read
            python = interpreter.for_sandbox(separate_uid=True)
            argv[0] = python.executable
            env.update(python.environ(), PYTHONPATH=str(PACKAGE.parent))
        with Bus(cfg.broker, f"{cfg.node.name}-start-{secrets.token_hex(3)}", session_expiry=0) as bus:
            bus.connect(timeout)
            topic = PRESENCE.topic(node=cfg.node.name)
            started = time.time()
            service.start(argv, env=env, user=self.user)
            bus.subscribe(topic)

            def announced() -> bool:
                while not bus.inbox.empty():
                    msg = bus.inbox.get()
                    if msg.payload and PRESENCE.decode(msg.payload).ts >= started:
                        return True
                return service.pid() is None
            if not wait_for(announced, timeout) or service.pid() is None:
                raise service.fail("did not announce itself on the broker")

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop agent, kubo, broker (in that order, so the agent can say goodbye)."""
        return [name for name in reversed(SERVICES) if self.services[name].stop(timeout)]

    def status(self) -> list[ServiceStatus]:
        rows = []
        cfg = self.config
        addresses = {
            "mosquitto": f"{cfg.broker.host}:{cfg.broker.port}",
            "ipfs": f"api {cfg.kubo_api_url}, swarm {cfg.node.host}:{cfg.kubo.swarm_port}",
            "agent": f"node {cfg.node.name}, peer {self.peer_id()}",
        }
        for name, service in self.services.items():
            if name == "mosquitto" and not cfg.broker.hosted:
                continue
            rows.append(ServiceStatus(name, service.pid(), addresses[name]))
        return rows
