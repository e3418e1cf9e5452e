"""Fixtures for the multi-host tests: one four-host swarm per module, made healthy
again before each test (a test may kill an agent or restart the broker)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.multihost.harness import Cluster, Gates, Lab


@pytest.fixture(scope="module")
def four_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A broker host plus three workers, each in its own network namespace."""
    if os.geteuid() != 0:
        pytest.fail("multi-host tests need root to create network namespaces "
                    "(leave them out with -m 'not netns')")
    if shutil.which("ip") is None:
        pytest.fail("multi-host tests need iproute2's `ip` command (apt-get install iproute2)")
    base = tmp_path_factory.mktemp("multihost")
    lab = Lab(4, base)
    cluster = Cluster(lab, base)
    try:
        lab.create()
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.close()
        finally:
            lab.destroy()


@pytest.fixture
def cluster(four_hosts: Cluster) -> Iterator[Cluster]:
    """The shared swarm with every node live; the test's jobs are stopped afterwards."""
    four_hosts.ensure_healthy()
    yield four_hosts
    four_hosts.stop_jobs()


@pytest.fixture
def gates(four_hosts: Cluster) -> Iterator[Gates]:
    """This test's gates; all opened at the end, so no user code stays held."""
    made = four_hosts.new_gates()
    yield made
    made.open_all()
