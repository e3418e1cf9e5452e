"""A node's configuration: ``$IPDC_HOME/ipdc.conf`` (YAML), loaded once and validated.

Each section is a frozen dataclass. Loading rejects unknown keys and wrong types
with the dotted name of the bad key, so a typo such as ``broker.prot`` fails at
start-up instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ipdc import ipdc_home
from ipdc.errors import ConfigError
from ipdc.private import write_private
from ipdc.wire.inline import INLINE_LIMIT, INLINE_MAX
from ipdc.wire.schema import build

CONFIG_NAME = "ipdc.conf"
__all__ = ["CONFIG_NAME", "Config", "ipdc_home", "load_config", "save_config"]


@dataclass(frozen=True)
class NodeSection:
    name: str = ""
    """The node's identity: the CN of its broker certificate, its MQTT user name, and the key
    of its topics (``ipdc/peer/<name>/...``). The founder gives it when the node joins."""
    host: str = "127.0.0.1"
    """Address the node's services bind to and advertise to other nodes."""
    slots: int = 0
    """Tasks run at once; 0 means one per CPU core."""
    tf: str = "auto"
    """Offer TensorFlow tasks: ``auto`` (when tensorflow is installed), ``yes`` or ``no``."""


#: Where ``init`` puts a node's broker credentials; relative paths are under the node's home.
CA_FILE = "keys/ca.crt"
CERT_FILE = "keys/node.crt"
KEY_FILE = "keys/node.key"


@dataclass(frozen=True)
class BrokerSection:
    host: str = "127.0.0.1"
    port: int = 8883
    """MQTT over TLS (8883 is its registered port); the broker has no plaintext listener."""
    hosted: bool = False
    """True when this node runs the swarm's mosquitto."""
    ca_file: str = CA_FILE
    """The swarm's CA certificate. It is the only issuer this node accepts for the broker's
    certificate: pinned when the node joined, from its invite."""
    cert_file: str = CERT_FILE
    """This node's certificate (CN = node.name), signed by the swarm's CA."""
    key_file: str = KEY_FILE
    """Its private key (0600); it never leaves the node."""


@dataclass(frozen=True)
class KuboSection:
    binary: str = ""
    api_port: int = 5001
    swarm_port: int = 4001
    bootstrap: list[str] = field(default_factory=list)
    """Multiaddrs of swarm members this node dials and keeps peered with."""
    memory_limit_mb: int = 0
    """A soft memory limit for kubo (Go's GOMEMLIMIT, with GOGC=50): its garbage collector
    works harder to stay under it. 0: Go's defaults. ``init --small`` sets 64."""


@dataclass(frozen=True)
class AgentSection:
    heartbeat_interval: float = 2.0
    peer_timeout: float = 10.0
    """A peer silent for this long is taken as dead."""
    warm_runners: int = 1
    """Idle user-code processes kept started, so a task need not wait for an interpreter."""
    manifest_ttl: float = 600.0
    """A job manifest older than this (seconds) is refused as a possible replay."""
    job_lease: float = 120.0
    """A job whose submitter has said nothing for this long (seconds) is dropped here: its
    runners stopped, its work dir deleted, its files unpinned. Submitters renew well within it."""
    ready_timeout: float = 30.0
    """As a submitter: a worker that has not accepted a job this long after it was asked is
    replaced (an agent that refuses a job, say for an untrusted key, never answers)."""
    inline_max: int = INLINE_MAX
    """As a submitter: payloads (code, chunks, map outputs, parts) of at most this many bytes
    travel inside the job's messages, beside their CID, instead of through a kubo round trip
    each (see ipdc/wire/inline.py); 0 sends everything through IPFS. At most 262144."""


@dataclass(frozen=True)
class SandboxSection:
    """Limits of the sandboxed runners that run user code (see ipdc/agent/sandbox.py)."""

    cpu_seconds: int = 3600
    """RLIMIT_CPU of one runner, over all the tasks of its job it serves."""
    memory_mb: int = 4096
    """Memory of one runner: its memory cgroup's limit (what it holds, its /job files
    included) and RLIMIT_AS (its address space)."""
    file_mb: int = 4096
    """RLIMIT_FSIZE: the largest file user code may write."""
    task_timeout: float = 3600.0
    """Wall-clock seconds per task before its runner is killed."""
    nice: int = 19
    """Added to the runner's CPU niceness, so a volunteer's machine stays usable."""
    max_pids: int = 64
    """Processes and threads one runner may have at once: pids.max of its cgroup, and
    RLIMIT_NPROC inside its sandbox (the bound where no pids cgroup is available)."""
    cpu_percent: int = 100
    """CPU bandwidth of one runner, in percent of one core (its cgroup's CPU quota); 0
    for no limit."""
    disk_mb: int = 1024
    """Disk quota of one runner: the size of its writable /job (and /tmp), a tmpfs that
    counts against memory_mb."""
    fetch_stall: float = 30.0
    """Fetching a task's input fails when no byte arrives for this long: the peer
    holding the data may have left, and the task can be retried elsewhere."""
    shared_dirs: list[str] = field(default_factory=list)
    """Host directories every runner sees, read-only, at the same path (say a dataset
    kept on this machine). Nothing of the host is visible otherwise. As root, every
    directory on the way must be searchable by others: runners run under uids of their own."""


@dataclass(frozen=True)
class TfSection:
    """Distributed TensorFlow (``ipdc tf``) on this node."""

    trusted_network: bool = False
    """TensorFlow's own requirement, stated in its SECURITY.md: a TF server executes any graph
    it is sent, with no authentication. IPDC keeps every TF server of this node in a
    loopback-only network namespace, reachable only through the private swarm. Where the
    node cannot make one (no unprivileged user namespaces, no bubblewrap), it refuses TF
    tasks, unless this says that everyone who can reach the node's network may run code on it."""


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    kubo: KuboSection = field(default_factory=KuboSection)
    agent: AgentSection = field(default_factory=AgentSection)
    sandbox: SandboxSection = field(default_factory=SandboxSection)
    tf: TfSection = field(default_factory=TfSection)

    @property
    def slots(self) -> int:
        return self.node.slots or os.cpu_count() or 1

    @property
    def kubo_api_url(self) -> str:
        """kubo's RPC API listens on loopback only: it is an admin interface."""
        return f"http://127.0.0.1:{self.kubo.api_port}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and built-in types only (validated str subtypes become str)."""
        data: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self)))
        return data

    def replace(self, **sections: Any) -> Config:
        """A copy with some fields changed: ``cfg.replace(kubo={"api_port": 5002})``."""
        data = self.to_dict()
        for name, values in sections.items():
            data[name].update(values)
        return config_from_dict(data)


def config_from_dict(data: Any) -> Config:
    cfg = build(Config, data, "", ConfigError)
    for section in dataclasses.fields(cfg):
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            # YAML's .nan passes every range check below, and .inf overflows a thread's wait
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{key}: must be a finite number of seconds, got {value}")
    for where, port in (
        ("broker.port", cfg.broker.port),
        ("kubo.api_port", cfg.kubo.api_port),
        ("kubo.swarm_port", cfg.kubo.swarm_port),
    ):
        if not 0 < port < 65536:
            raise ConfigError(f"{where}: {port} is not a TCP port (1-65535)")
    if cfg.agent.heartbeat_interval <= 0 or cfg.agent.peer_timeout <= cfg.agent.heartbeat_interval:
        raise ConfigError("agent.peer_timeout must be larger than agent.heartbeat_interval (> 0)")
    if cfg.agent.warm_runners < 0:
        raise ConfigError(f"agent.warm_runners: must be 0 (no spare runner) or more, got {cfg.agent.warm_runners}")
    if cfg.kubo.memory_limit_mb < 0:
        raise ConfigError("kubo.memory_limit_mb: must be 0 (no limit) or a number of MB, "
                          f"got {cfg.kubo.memory_limit_mb}")
    for where, value in (("agent.manifest_ttl", cfg.agent.manifest_ttl),
                         ("agent.job_lease", cfg.agent.job_lease),
                         ("agent.ready_timeout", cfg.agent.ready_timeout)):
        if value <= 0:
            raise ConfigError(f"{where}: must be a positive number of seconds, got {value}")
    if not 0 <= cfg.agent.inline_max <= INLINE_LIMIT:
        raise ConfigError(f"agent.inline_max: must be 0 (every payload through IPFS) to {INLINE_LIMIT} "
                          f"bytes, got {cfg.agent.inline_max}")
    for key in ("ca_file", "cert_file", "key_file"):
        if not getattr(cfg.broker, key):
            raise ConfigError(f"broker.{key}: must name a file (relative paths are under the node's home)")
    if cfg.node.tf not in ("auto", "yes", "no"):
        raise ConfigError(f"node.tf: {cfg.node.tf!r} is not one of auto, yes, no")
    if cfg.node.slots < 0:
        raise ConfigError("node.slots: must be 0 (one per core) or a positive number")
    box = cfg.sandbox
    for where, value in (("sandbox.cpu_seconds", box.cpu_seconds), ("sandbox.memory_mb", box.memory_mb),
                         ("sandbox.file_mb", box.file_mb), ("sandbox.task_timeout", box.task_timeout),
                         ("sandbox.max_pids", box.max_pids), ("sandbox.fetch_stall", box.fetch_stall),
                         ("sandbox.disk_mb", box.disk_mb)):
        if value <= 0:
            raise ConfigError(f"{where}: must be positive, got {value}")
    for path in box.shared_dirs:
        if not path.startswith("/"):
            raise ConfigError(f"sandbox.shared_dirs: {path!r} is not an absolute path")
    if box.cpu_percent < 0:
        raise ConfigError(f"sandbox.cpu_percent: must be 0 (no limit) or a percentage of one core, got "
                          f"{box.cpu_percent}")
    if not 0 <= box.nice <= 19:
        raise ConfigError(f"sandbox.nice: must be 0 to 19 (added to the runners' niceness), got {box.nice}")
    return cfg


def load_config(path: Path) -> Config:
    """Read and validate one ipdc.conf. Errors name the file and the bad key."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: run `python deploy.py init` (or `ipdc node init`) first"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_broker_files(cfg: Config, path: Path) -> Config:
    """``cfg`` (read from ``path``) with the broker's TLS files made absolute: relative ones
    are under the config's own directory, the node's home, so a home can move. They are
    checked here, naming the key, rather than at the first connect."""
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        file = (path.parent / getattr(cfg.broker, key)).absolute()
        if not file.is_file():
            raise ConfigError(f"{path}: broker.{key}: {file} does not exist (the node's broker credentials "
                              "are written by `python deploy.py init`)")
        files[key] = str(file)
    mode = Path(files["key_file"]).stat().st_mode & 0o077
    if mode:
        raise ConfigError(f"{path}: broker.key_file: {files['key_file']} is readable by other users "
                          f"(mode {mode:#o} for group/others): run `chmod 600 {files['key_file']}`")
    broker = dataclasses.replace(cfg.broker, ca_file=files["ca_file"], cert_file=files["cert_file"],
                                 key_file=files["key_file"])
    return dataclasses.replace(cfg, broker=broker)


def save_config(cfg: Config, path: Path) -> None:
    """Write atomically, readable by the owner only."""
    write_private(path, "# IPDC node configuration. Written by `ipdc node init`; see ipdc.conf in the\n"
                        "# IPDC repository for what each key means.\n"
                        + yaml.safe_dump(cfg.to_dict(), sort_keys=False), replace=True)
