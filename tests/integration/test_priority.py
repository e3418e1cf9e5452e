"""User code runs at ``sandbox.nice`` (19 by default), in map and in reduce, so a volunteer's
machine stays usable; tiny-job latency work must not raise it (see bench/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

from ipdc.node.cluster import LocalCluster
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import MapReduceController, MapReduceJob

MAP = "import os\n\ndef map_chunk(text):\n    return {'nice': os.nice(0)}.items()\n"
REDUCE = "import os\n\ndef reduce(key, values):\n    return [*values, os.nice(0)]\n"


def test_user_code_runs_at_sandbox_nice(swarm: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "Map.py").write_text(MAP)
    (tmp_path / "Reduce.py").write_text(REDUCE)
    (tmp_path / "in.txt").write_text("x\n")
    node = swarm.nodes[0]
    job = MapReduceJob(tmp_path / "in.txt", k=2, map_file=tmp_path / "Map.py",
                       reduce_file=tmp_path / "Reduce.py", output=tmp_path / "out")
    with SwarmClient(node.config, node.signer).connect() as client, node.kubo() as kubo:
        result = MapReduceController(client, kubo, job, node.home).run()
    lines = b"".join(p.read_bytes() for p in sorted(result.output.glob("part-*"))).decode().splitlines()
    nice = node.config.sandbox.nice
    assert nice == 19 and os.nice(0) < nice
    assert lines == [f"nice\t[{nice}, {nice}]"]  # what map saw, and what reduce saw
