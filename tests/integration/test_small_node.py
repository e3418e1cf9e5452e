"""`ipdc node init --small`: a node for a board with little memory still does its work.

The profile's settings are checked where they take effect (kubo's config and its
process's environment, the node's config), and a small swarm runs a job with exact
counts. What it saves is measured, not asserted: `python bench/scale.py --footprint`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.node.cluster import LocalCluster
from tests.helpers import read_output, reference_counts, run_cli

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(2, base=tmp_path_factory.mktemp("small"), small=True) as cluster:
        yield cluster


def test_a_small_node_is_made_with_the_low_memory_settings(small: LocalCluster) -> None:
    for node in small.nodes:
        cfg = node.config
        assert (cfg.kubo.memory_limit_mb, cfg.agent.warm_runners, cfg.node.slots) == (64, 0, 1)
        kubo_config = json.loads((node.kubo_repo / "config").read_text())
        assert kubo_config["Routing"]["Type"] == "dhtclient"
        assert kubo_config["Swarm"]["ConnMgr"]["HighWater"] <= 100  # kubo's lowpower profile
        pid = node.services["ipfs"].pid()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"GOMEMLIMIT=64MiB" in environ and b"GOGC=50" in environ


def test_a_small_swarm_runs_a_job_exactly(small: LocalCluster, tmp_path: Path) -> None:
    data = b"small boards count words too\nwords words\n" * 500
    (tmp_path / "in.txt").write_bytes(data)
    run_cli(["mr", "--k", "2", str(tmp_path / "in.txt"), "-q", "-o", str(tmp_path / "out")], small.nodes[0].home)
    assert read_output(tmp_path / "out", 2)[0] == reference_counts(data)
