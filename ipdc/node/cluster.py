"""A throwaway swarm on this machine: mosquitto, and N nodes (kubo + agent each).

``ipdc mr`` starts one when no node runs for the current IPDC_HOME, so a
newcomer's first command works with nothing set up; tests and benchmarks use it
too. The nodes are real: the first founds the swarm (its CA) and hosts the broker,
the others join it with invite tokens, exactly as ``deploy.py init --join-file``
does: each enrolls with the founder's agent over MQTT/TLS.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ipdc.config import save_config
from ipdc.net import free_port
from ipdc.node.lifecycle import Node
from ipdc.node.membership import invite

log = logging.getLogger(__name__)

PORT_KEYS = ("broker", "api", "swarm")


def local_slots(n: int) -> int:
    """Slots per node when ``n`` nodes share this machine: its cores split between them.

    ``node.slots = 0`` means one slot per core, right for a node that has its
    machine to itself. Here every node would count the same cores, so 2 nodes on
    2 cores would run 4 runners at once: they contend for the CPU, each holds a
    chunk in memory, and a job is split for 4 runners where 2 do the work.
    """
    return max(1, (os.cpu_count() or 1) // n)


class LocalCluster:
    """``n`` real nodes under one temporary directory, on 127.0.0.1."""

    def __init__(self, n: int, base: Path | None = None, slots: int = 0, keep: bool = False,
                 tf: dict[int, str] | None = None, settings: dict[str, dict[str, Any]] | None = None,
                 user: str | None = None, small: bool = False) -> None:
        """``slots``: tasks each node runs at once; 0 shares the cores (:func:`local_slots`).
        ``small``: every node made as ``ipdc node init --small`` makes it.
        ``user``: the nodes' homes belong to that user and their agents run as it (the cluster
        is made by root; kubo and mosquitto stay root's), as on a machine whose node runs as a
        dedicated user. ``base`` must then be a directory that user can reach."""
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.n = n
        self.slots = slots or local_slots(n)
        self.keep = keep
        self.tf = tf or {}
        """node.tf of some nodes by index, e.g. ``{3: "no"}`` for a node that never hosts TF."""
        self.settings = settings or {}
        """ipdc.conf sections for every node, e.g. ``{"sandbox": {"task_timeout": 5}}``."""
        self.user = user
        self.small = small
        self.base = base or Path(tempfile.mkdtemp(prefix="ipdc-cluster-"))
        self.nodes: list[Node] = []

    def start(self) -> LocalCluster:
        taken: set[int] = set()

        def ports() -> dict[str, int]:
            chosen = {}
            for key in PORT_KEYS:
                chosen[key] = free_port("127.0.0.1", 0, taken)
                taken.add(chosen[key])
            return chosen

        try:
            first = Node(self.base / "node-0", self.user)
            self.nodes.append(first)
            first.init(host="127.0.0.1", slots=self.slots, ports=ports(), small=self.small)
            self._configure(0)
            self._give(first)
            first.start()
            others = [Node(self.base / f"node-{i}", self.user) for i in range(1, self.n)]
            self.nodes.extend(others)
            for node in others:
                node.init(host="127.0.0.1", slots=self.slots, ports=ports(), join=invite(first),
                          small=self.small)
            for i in range(1, self.n):
                self._configure(i)
            # One person's machine: every node runs jobs submitted from any of them.
            for node in others:
                first.trust.add(node.signer.public_key, node.config.node.name)
                for other in others:
                    other.trust.add(node.signer.public_key, node.config.node.name)
            for node in others:
                self._give(node)
            if others:
                with ThreadPoolExecutor(len(others)) as pool:
                    list(pool.map(lambda node: node.start(), self.nodes[1:]))
        except BaseException:
            self.close()
            raise
        return self

    def _configure(self, i: int) -> None:
        """Write node ``i``'s settings before it starts (a fresh Node re-reads them)."""
        sections = {**self.settings, **({"node": {"tf": self.tf[i]}} if i in self.tf else {})}
        if sections:
            node = self.nodes[i]
            save_config(node.config.replace(**sections), node.conf_path)
            self.nodes[i] = Node(node.home, self.user)

    def _give(self, node: Node) -> None:
        """Hand a node's home to the cluster's user (after every file of it was made)."""
        if self.user is None:
            return
        for path in [node.home, *node.home.rglob("*")]:
            shutil.chown(path, self.user, self.user)

    def close(self) -> None:
        """Stop every node (agents first, the broker host last) and delete the files."""
        for node in reversed(self.nodes):
            node.stop()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
