"""A node's lifecycle: init (found or join a swarm), start, stop, status.

The files it creates are described in :mod:`ipdc.home`; founding, invites and joining
are in :mod:`ipdc.node.membership`.
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

from ipdc.bus import Bus, client_id
from ipdc.config import (
    CERT_FILE,
    KEY_FILE,
    AgentSection,
    BrokerSection,
    Config,
    KuboSection,
    NodeSection,
    save_config,
)
from ipdc.ctlsock import ControlClient, socket_path
from ipdc.errors import ControlError, NodeError
from ipdc.home import NodeHome
from ipdc.isolation import interpreter
from ipdc.net import free_port, port_in_use, port_open
from ipdc.node.broker import Broker
from ipdc.node.install import ensure_kubo, ensure_mosquitto, ensure_plugin
from ipdc.node.invite import Invite
from ipdc.node.membership import enroll, found
from ipdc.private import private_dir, write_private
from ipdc.spawn import PACKAGE, Service, wait_for
from ipdc.wire.ids import NodeName
from ipdc.wire.presence import PRESENCE

log = logging.getLogger(__name__)

#: kubo's soft memory limit on a small node (``init --small``): measured, an idle small node
#: (kubo, agent, zygote, controller service) then stays under 128 MB of PSS (bench/scale.py).
SMALL_KUBO_MB = 64
#: Machines with less memory than this get a small node without asking.
SMALL_BELOW_MB = 1024


def total_memory_mb() -> int:
    """The machine's memory (MemTotal), in MB; a large number when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30

SERVICES = ("mosquitto", "ipfs", "agent", "control")


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    address: str

    @property
    def state(self) -> str:
        return "running" if self.pid else "stopped"


class Node(NodeHome):
    """The node whose state lives in ``home``, with its services."""

    def __init__(self, home: Path | None = None, user: str | None = None) -> None:
        """``user``: run the agent as that user (started by root; see LocalCluster's ``user``)."""
        super().__init__(home)
        self.user = user
        self.services = {name: Service(self.home, name) for name in SERVICES}

    def running(self) -> bool:
        """Whether the node serves jobs: its agent runs, and its controller service for
        the jobs submitted here."""
        return all(self.services[name].pid() is not None for name in ("agent", "control"))

    # -- init ------------------------------------------------------------------------
    def init(self, host: str = "127.0.0.1", join: Invite | None = None, slots: int = 0,
             ports: dict[str, int] | None = None, small: bool = False) -> str:
        """Create the node: found a swarm (CA, broker, the first member), or join one with an
        invite. Idempotent: on an initialised home it changes nothing.

        ``small``: a node for a board with little memory (a 128 MB Raspberry Pi): kubo's
        ``lowpower`` profile and a 64 MB soft limit, one slot, and no warm spare runner (a
        task then waits ~80 ms for a sandbox to start)."""
        if self.initialised:
            return (f"{self.home} is already initialised (node {self.config.node.name}, "
                    f"peer {self.peer_id()}); nothing changed")
        if not small and total_memory_mb() < SMALL_BELOW_MB:
            log.warning("this machine has %d MB of memory: making a small node (see `ipdc node init --help`)",
                        total_memory_mb())
            small = True
        kubo_binary = ensure_kubo()
        plugin = ensure_plugin() if join is None else None
        taken: set[int] = set()
        wanted = {"broker": 8883, "api": 5001, "swarm": 4001, **(ports or {})}
        chosen = {}
        for key, preferred in wanted.items():
            bind = "127.0.0.1" if key == "api" else host
            chosen[key] = free_port(bind, preferred, taken)
            taken.add(chosen[key])

        private_dir(self.home)
        for sub in ("logs", "run", "work"):
            (self.home / sub).mkdir(exist_ok=True)
        private_dir(self.keys_dir)
        if join is None:
            assert plugin is not None
            name = NodeName.new()
            found(self, name, host, chosen["broker"], plugin)
            swarm_key, bootstrap, trusted = secrets.token_hex(32), [], []
            broker = BrokerSection(host=host, port=chosen["broker"], hosted=True)
        else:
            enrolled = enroll(self, join, host)
            name = NodeName(enrolled.name)
            write_private(self.home / KEY_FILE, enrolled.key_pem)
            (self.home / CERT_FILE).write_bytes(enrolled.cert_pem)
            self.founder_file.write_text(join.founder + "\n")
            swarm_key, bootstrap, trusted = enrolled.swarm_key, enrolled.bootstrap, enrolled.trusted
            broker = BrokerSection(host=join.broker_host, port=join.broker_port, hosted=False)
        self._init_kubo(kubo_binary, swarm_key, host, chosen, bootstrap, small)
        cfg = Config(
            node=NodeSection(name=name, host=host, slots=slots or (1 if small else 0)),
            broker=broker,
            kubo=KuboSection(binary=str(kubo_binary), api_port=chosen["api"], swarm_port=chosen["swarm"],
                             bootstrap=bootstrap, memory_limit_mb=SMALL_KUBO_MB if small else 0),
            agent=AgentSection(warm_runners=0 if small else 1),
        )
        save_config(cfg, self.conf_path)
        self._config = None  # loaded again: the broker's files become absolute paths
        self.trust.add(self.signer.public_key, f"{name} (this node)")
        for key in trusted:
            self.trust.add(key, "from the founder, at join")
        role = "joined the swarm" if join else "founded a new private swarm (this node hosts the broker)"
        return f"initialised {self.home}: node {name}, peer {self.peer_id()}, {role}"

    def _init_kubo(self, binary: Path, swarm_key: str, host: str, ports: dict[str, int],
                   bootstrap: list[str], small: bool) -> None:
        # kubo's own `lowpower` profile for a small node: fewer connections, a client-only DHT,
        # no background reproviding.
        profiles = "test,lowpower" if small else "test"
        done = subprocess.run([str(binary), "init", "--empty-repo", f"--profile={profiles}"],
                              env=self.kubo_env(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NodeError(f"`ipfs init` failed in {self.kubo_repo}: {done.stderr.strip()}")
        self.write_swarm_key(swarm_key)
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
        # A private network refuses Routing.Type=auto (lowpower's); a small node only asks the DHT.
        kc["Routing"]["Type"] = "dhtclient" if small else "dht"
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
        write_private(self.kubo_secret_file, secret + "\n")
        return secret

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
        starters = {"mosquitto": self._start_broker, "ipfs": self._start_kubo, "agent": self._start_agent,
                    "control": self._start_control}
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
        binary = ensure_mosquitto()
        broker = Broker(self.home)
        plugin = ensure_plugin()  # built again if the cache was cleared or IPDC's source changed
        if broker.plugin() != plugin:
            broker.set_plugin(plugin)
        broker.write_acl(cfg.node.name)  # the broker's host is the founder
        service = self.services["mosquitto"]
        service.start([str(binary), "-c", str(broker.conf)])
        address = (cfg.broker.host, cfg.broker.port)
        opened = wait_for(lambda: port_open(*address) or service.pid() is None, timeout)
        if not opened or service.pid() is None:
            raise service.fail(f"did not open {cfg.broker.host}:{cfg.broker.port}")

    def _start_kubo(self, cfg: Config, timeout: float) -> None:
        self.start_kubo(timeout)

    def _start_agent(self, cfg: Config, timeout: float) -> None:
        service = self.services["agent"]
        env = {**os.environ, "IPDC_HOME": str(self.home)}
        argv = [sys.executable, "-m", "ipdc.agent"]
        if self.user is not None:  # a Python, and this ipdc, that the user can read
            python = interpreter.for_sandbox(separate_uid=True)
            argv[0] = python.executable
            env.update(python.environ(), PYTHONPATH=str(interpreter.readable_package(PACKAGE)))
        with Bus(cfg.broker, client_id(cfg.node.name, "start"), session_expiry=0) as bus:
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

    def _start_control(self, cfg: Config, timeout: float) -> None:
        """The controller service answers on its socket once it is connected and has taken up
        the jobs it was running when it stopped."""
        service = self.services["control"]
        service.start([sys.executable, "-m", "ipdc.control"], env={**os.environ, "IPDC_HOME": str(self.home)})
        client = ControlClient(self.home, timeout=5)

        def answers() -> bool:
            try:
                client.call("ping")
                return True
            except ControlError:
                return service.pid() is None
        if not wait_for(answers, timeout) or service.pid() is None:
            raise service.fail("did not answer on its socket")

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop the controller service, agent, kubo, broker (in that order, so the agent can
        say goodbye)."""
        return [name for name in reversed(SERVICES) if self.services[name].stop(timeout)]

    def status(self) -> list[ServiceStatus]:
        rows = []
        cfg = self.config
        addresses = {
            "mosquitto": f"{cfg.broker.host}:{cfg.broker.port}",
            "ipfs": f"api {cfg.kubo_api_url}, swarm {cfg.node.host}:{cfg.kubo.swarm_port}",
            "agent": f"node {cfg.node.name}, peer {self.peer_id()}",
            "control": str(socket_path(self.home)),
        }
        for name, service in self.services.items():
            if name == "mosquitto" and not cfg.broker.hosted:
                continue
            rows.append(ServiceStatus(name, service.pid(), addresses[name]))
        return rows
