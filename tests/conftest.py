"""Shared fixtures. Integration tests run real mosquitto, kubo and agent processes
on 127.0.0.1 with free ports and temporary homes; nothing is mocked there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ipdc.node.cluster import LocalCluster


@pytest.fixture(scope="session")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three real nodes (kubo + agent each, node 0 hosts mosquitto), shared by tests
    that only submit jobs."""
    with LocalCluster(3, base=tmp_path_factory.mktemp("swarm")) as cluster:
        yield cluster
