"""A node's home directory: where its config, keys, kubo repo and jobs live.

Everything a node owns lives under its home (``$IPDC_HOME``, default ``~/.ipdc``):

    ipdc.conf          the node's configuration (YAML, mode 0600)
    kubo/              the kubo repo (IPFS_PATH), with swarm.key (0600)
    broker/            mosquitto.conf, acl, broker.crt/.key, revoked, enroll-used,
                       members.json, data/                (broker host only)
    logs/              agent.log, ipfs.log, mosquitto.log, control.log, runners.log
    run/               agent.pid, ipfs.pid, mosquitto.pid, control.pid, nonces (seen manifest
                       nonces), control.sock (the controller service's socket, 0600)
    ipdc.db            the job history of the jobs this node submitted (SQLite)
    keys/submitter.key this node's Ed25519 key: it signs the jobs this node submits
    keys/node.crt|key  its broker identity (ECDSA P-256, CN = node name), ca.crt the swarm's CA
    keys/ca.key        the swarm's CA key                   (founding node only)
    keys/founder.pub   the founder's submitter key: it signs membership changes
    keys/kubo-api.secret the bearer secret kubo's RPC API demands (mode 0600)
    trusted_keys       submitters whose jobs this node runs (``ipdc trust``)
    work/<job-id>/     one directory per job, removed by CleanUp

so several nodes can share one machine, each with its own home. Both the running
agent and the node tooling read it; only the tooling (:mod:`ipdc.node`) creates it.
The home is 0700 and every secret in it 0600 (:mod:`ipdc.private`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path

from ipdc.config import CONFIG_NAME, Config, ipdc_home, load_config, resolve_broker_files
from ipdc.errors import KuboError, NodeError
from ipdc.kubo import KuboClient
from ipdc.private import write_private
from ipdc.spawn import Service, wait_for
from ipdc.trust import NonceLog, Signer, TrustStore
from ipdc.wire.membership import check_swarm_key

log = logging.getLogger(__name__)


class NodeHome:
    """The files of the node whose state lives in ``home``."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home or ipdc_home()).absolute()
        self.conf_path = self.home / CONFIG_NAME
        self.kubo_repo = self.home / "kubo"
        self.work_dir = self.home / "work"
        self.keys_dir = self.home / "keys"
        self.broker_dir = self.home / "broker"
        self.ca_key = self.keys_dir / "ca.key"
        """The swarm CA's key: only the founding node has one."""
        self.founder_file = self.keys_dir / "founder.pub"
        self._config: Config | None = None

    @property
    def initialised(self) -> bool:
        return self.conf_path.exists()

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = resolve_broker_files(load_config(self.conf_path), self.conf_path)
        return self._config

    def peer_id(self) -> str:
        """The kubo peer ID, read from the repo: stable across restarts."""
        try:
            return str(json.loads((self.kubo_repo / "config").read_text())["Identity"]["PeerID"])
        except (OSError, ValueError, KeyError) as exc:
            raise NodeError(f"cannot read the kubo identity in {self.kubo_repo}: {exc}") from None

    @property
    def kubo_secret_file(self) -> Path:
        return self.home / "keys" / "kubo-api.secret"

    def kubo(self, timeout: float = 60.0) -> KuboClient:
        """A client of this node's kubo, with the API's bearer secret."""
        try:
            secret = self.kubo_secret_file.read_text().strip()
        except OSError as exc:
            raise NodeError(f"cannot read kubo's API secret {self.kubo_secret_file} ({exc}); the node's "
                            "IPDC processes need it: run them as the user that owns the node") from None
        return KuboClient(self.config.kubo_api_url, secret=secret, timeout=timeout)

    def kubo_env(self) -> dict[str, str]:
        env = {**os.environ, "IPFS_PATH": str(self.kubo_repo), "LIBP2P_FORCE_PNET": "1",
               "IPFS_TELEMETRY": "off"}
        limit = self.config.kubo.memory_limit_mb if self.initialised else 0
        if limit:
            env.update(GOMEMLIMIT=f"{limit}MiB", GOGC="50")
        return env

    def swarm_multiaddr(self) -> str:
        cfg = self.config
        return f"/ip4/{cfg.node.host}/tcp/{cfg.kubo.swarm_port}/p2p/{self.peer_id()}"

    @property
    def signer(self) -> Signer:
        return Signer.load_or_create(self.home / "keys" / "submitter.key")

    @property
    def trust(self) -> TrustStore:
        return TrustStore(self.home / "trusted_keys")

    def nonces(self) -> NonceLog:
        return NonceLog(self.home / "run" / "nonces", self.config.agent.manifest_ttl)

    # -- identity ----------------------------------------------------------------------
    @property
    def is_founder(self) -> bool:
        return self.ca_key.exists()

    def founder_key(self) -> str:
        """The founder's submitter key: the only key whose removals and swarm keys this node
        obeys. A joined node keeps it from its invite."""
        if self.is_founder:
            return self.signer.public_key
        try:
            return self.founder_file.read_text().strip()
        except OSError as exc:
            raise NodeError(f"cannot read the founder's key {self.founder_file}: {exc}") from None

    @property
    def instance(self) -> str:
        """Which home on which machine this is (a hash of the machine id and the home's path):
        announced in presence, so a copy of this home started elsewhere is told apart."""
        machine = ""
        for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
            try:
                machine = Path(path).read_text().strip()
                break
            except OSError:
                continue
        seed = f"{machine or socket.gethostname()}\0{self.home}"
        return hashlib.sha256(seed.encode()).hexdigest()[:16]

    # -- kubo ----------------------------------------------------------------------------
    def swarm_key(self) -> str:
        """The kubo private-network key, 64 hex digits."""
        try:
            return check_swarm_key((self.kubo_repo / "swarm.key").read_text().split()[-1])
        except (OSError, IndexError) as exc:
            raise NodeError(f"cannot read the swarm key in {self.kubo_repo}: {exc}") from None

    def write_swarm_key(self, key: str) -> None:
        """Write (or replace) ``kubo/swarm.key``, 0600; kubo reads it when it starts."""
        text = f"/key/swarm/psk/1.0.0/\n/base16/\n{check_swarm_key(key)}\n"
        write_private(self.kubo_repo / "swarm.key", text, replace=True)

    def start_kubo(self, timeout: float) -> None:
        """Start this home's kubo daemon, wait until its API answers, and dial the bootstrap
        peers; NodeError with the end of its log when it does not come up."""
        cfg = self.config
        service = Service(self.home, "ipfs")
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

    def connect_swarm(self, kubo: KuboClient) -> bool:
        """Dial the bootstrap peers we are not connected to (again after a partition); True
        when we are connected to all of them."""
        cfg = self.config
        connected = {a.rsplit("/p2p/", 1)[1] for a in kubo.swarm_peers()}
        reached = True
        for addr in cfg.kubo.bootstrap:
            if addr.rsplit("/p2p/", 1)[1] not in connected:
                try:
                    kubo.swarm_connect(addr)
                except KuboError as exc:
                    reached = False
                    log.warning("cannot reach bootstrap peer %s yet (%s)", addr, exc)
        return reached


def _process_start(pid: int) -> str:
    """A process's start time in clock ticks since boot: with the pid, it names one process
    even after the pid is reused. "" when there is no such process, or only its zombie (a
    killed controller service whose parent has not reaped it yet is gone all the same)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return "" if fields[0] == "Z" else fields[19]
    except (OSError, IndexError):
        return ""


class SubmittedJobs:
    """What this node's running submitters pinned for their jobs, in ``run/jobs/``.

    A submitter pins a job's input and code in its own kubo and unpins them when the job
    ends. If it is killed first, nobody would: so it records them here, and the node's
    agent unpins the records of submitters that are gone (:meth:`orphans`).
    """

    def __init__(self, home: Path) -> None:
        self.dir = home / "run" / "jobs"

    def record(self, job_id: str, cids: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        entry = {"pid": pid, "start": _process_start(pid), "cids": cids}
        tmp = self.dir / f".{job_id}.tmp"
        tmp.write_text(json.dumps(entry))
        tmp.replace(self.dir / f"{job_id}.json")

    def forget(self, job_id: str) -> None:
        (self.dir / f"{job_id}.json").unlink(missing_ok=True)

    def orphans(self) -> list[tuple[str, list[str]]]:
        """(job id, pinned CIDs) of jobs whose submitting process is gone."""
        found = []
        for path in self.dir.glob("*.json") if self.dir.is_dir() else []:
            try:
                entry = json.loads(path.read_text())
                alive = _process_start(int(entry["pid"])) == entry["start"] != ""
                cids = [str(c) for c in entry["cids"]]
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("removing the unreadable submitter record %s", path)
                path.unlink(missing_ok=True)
                continue
            if not alive:
                found.append((path.stem, cids))
        return found


class RenewedJobs:
    """Jobs this node owns that outlive the command that started them (TF clusters), in
    ``run/renew/``: the node's agent renews their lease with each of their peers for as long
    as the record stays. Without it, every peer would drop the cluster after its
    ``agent.job_lease``; with it, a cluster whose owner node is gone still ends then."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "run" / "renew"

    def add(self, job_id: str, peers: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{job_id}.tmp"
        tmp.write_text(json.dumps({"peers": peers}))
        tmp.replace(self.dir / f"{job_id}.json")

    def remove(self, job_id: str) -> None:
        (self.dir / f"{job_id}.json").unlink(missing_ok=True)

    def entries(self) -> list[tuple[str, list[str]]]:
        """(job id, peers) of every job to renew."""
        found = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                found.append((path.stem, [str(p) for p in json.loads(path.read_text())["peers"]]))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("removing the unreadable renewal record %s", path)
                path.unlink(missing_ok=True)
        return found
