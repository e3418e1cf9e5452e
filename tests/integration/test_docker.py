"""docker-compose.yml run for real: the 3-node swarm comes up in containers and runs
WordCount on the shipped input with exact counts.

The images are built as a user would (``docker/prepare.sh``, then ``docker-compose build``),
under a tag of this checkout, so that the next run reuses the base image and the layer
cache; the swarm runs under a project name of its own, on a /24 no other Docker network
uses, and is removed with its containers, network and volumes whatever happens. Without
Docker the test fails and says why: it is never skipped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import REPO, read_output, reference_counts

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

K = 3
INPUT = "jobs/mapreduce/input.txt"
"""The shipped WordCount input, relative to the image's working directory (see docker/Dockerfile)."""


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command in the source tree; on failure (with ``check``) raise with its output."""
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}\n"
                             f"stdout:\n{done.stdout[-5000:]}\nstderr:\n{done.stderr[-5000:]}")
    return done


@dataclass
class Compose:
    """``docker-compose`` on this tree's docker-compose.yml, for one project."""

    project: str
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, *args: str, timeout: float = 300,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        """``docker-compose -p PROJECT -f docker-compose.yml ARGS``."""
        return run(["docker-compose", "-p", self.project, "-f", str(REPO / "docker-compose.yml"), *args],
                   timeout, self.env, check)

    def timed(self, what: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``docker-compose ARGS`` and record how long it took as ``timings[what]``."""
        started = time.monotonic()
        done = self(*args, timeout=timeout)
        self.timings[what] = time.monotonic() - started
        return done

    def container(self, service: str) -> str:
        """The id of the service's container."""
        return self("ps", "-q", service).stdout.strip()

    def leftovers(self) -> list[str]:
        """What Docker still holds of the project: containers, networks, volumes."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
            found += run(["docker", *kind, "-q", "--filter", label], 60).stdout.split()
        return found


def require_docker() -> None:
    """Fail, naming what is missing, unless a Docker engine and docker-compose are usable."""
    for tool, package in (("docker", "docker.io"), ("docker-compose", "docker-compose")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install {package}): the docker test cannot run")
    info = run(["docker", "info"], 60, check=False)
    if info.returncode != 0:
        pytest.fail(f"the Docker engine does not answer (start dockerd): {info.stderr.strip()[-500:]}")


def free_net(project: str) -> str:
    """The first three bytes of a 10.89.x.0/24 that overlaps no Docker network, starting at a
    place that depends on the project, so that concurrent runs do not pick the same one."""
    ids = run(["docker", "network", "ls", "-q"], 60).stdout.split()
    subnets = run(["docker", "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids],
                  60).stdout.split()
    used = [net for net in map(ipaddress.ip_network, subnets) if net.version == 4]
    start = int(hashlib.sha256(project.encode()).hexdigest(), 16)
    for i in range(190):
        prefix = f"10.89.{64 + (start + i) % 190}"
        if not any(ipaddress.ip_network(f"{prefix}.0/24").overlaps(net) for net in used):
            return prefix
    raise AssertionError(f"every 10.89.x.0/24 is taken by a Docker network: {used}")


def wait_for_peers(compose: Compose, n: int, timeout: float) -> None:
    """Poll ``ipdc peers`` on node1 until it lists ``n`` live peers."""
    deadline = time.monotonic() + timeout
    peers: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        done = compose("exec", "-T", "node1", "ipdc", "peers", "--json", check=False)
        if done.returncode == 0:
            peers = json.loads(done.stdout)
            if len(peers) == n:
                return
        time.sleep(1)
    raise AssertionError(f"node1 saw {len(peers)} live peers, not {n}, after {timeout:.0f} s:\n{peers}\n"
                         + compose("logs", "--no-color", "--tail=40", check=False).stdout)


@pytest.fixture(scope="module")
def swarm() -> Iterator[Compose]:
    """The compose swarm with 3 live peers; taken down, volumes included, on the way out."""
    require_docker()
    project = f"ipdctest{secrets.token_hex(4)}"
    # One image tag per checkout: reruns reuse it, and two checkouts never use each other's.
    tag = hashlib.sha256(str(REPO).encode()).hexdigest()[:8]
    env = {**os.environ, "IPDC_IMAGE": f"ipdc-node:test-{tag}", "IPDC_NET": free_net(project)}
    compose = Compose(project, env)
    started = time.monotonic()
    # The base image when it is missing (about a minute), and kubo, CAs and pip.conf in the context.
    run([str(REPO / "docker" / "prepare.sh")], 1200, compose.env)
    compose.timings["prepare"] = time.monotonic() - started
    compose.timed("build", "build", timeout=1200)
    try:
        compose.timed("up", "up", "-d", timeout=600)
        started = time.monotonic()
        wait_for_peers(compose, K, timeout=180)
        compose.timings["3 peers after up"] = time.monotonic() - started
        yield compose
    finally:
        print(compose("logs", "--no-color", "--tail=60", check=False).stdout)
        compose.timed("down", "down", "-v", "--remove-orphans", "-t", "30", timeout=300)
        print("timings (s):", {what: round(seconds, 1) for what, seconds in compose.timings.items()})
        left = compose.leftovers()
        assert not left, f"docker-compose down left containers, networks or volumes of {project}: {left}"


def test_compose_swarm_counts_words_exactly(swarm: Compose, tmp_path: Path) -> None:
    """`docker-compose exec node1 ipdc mr --k 3` on the shipped input: 3 workers, exact counts."""
    started = time.monotonic()
    done = swarm("exec", "-T", "node1", "ipdc", "mr", "--k", str(K), INPUT, "-o", "/tmp/wordcount", "--json")
    swarm.timings["mr"] = time.monotonic() - started
    summary = json.loads(done.stdout)
    assert len({worker["name"] for worker in summary["workers"]}) == K, summary["workers"]
    run(["docker", "cp", f"{swarm.container('node1')}:/tmp/wordcount", str(tmp_path / "out")], 60)
    assert (tmp_path / "out" / "_SUCCESS").exists()
    shipped = (REPO / "ipdc" / INPUT).read_bytes()
    assert read_output(tmp_path / "out", K)[0] == reference_counts(shipped)


def test_containers_grant_what_bubblewrap_needs(swarm: Compose) -> None:
    """bubblewrap as root in a node container: new pid, ipc, network and uts namespaces and a
    fresh /proc (SYS_ADMIN, NET_ADMIN and seccomp=unconfined in docker-compose.yml). It runs as
    a child of Python, as the agent starts it: started directly by ``docker exec``, bwrap with
    --unshare-net and --die-with-parent is killed (exit 137)."""
    bwrap = ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-net", "--unshare-uts", "--die-with-parent",
             "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "true"]
    swarm("exec", "-T", "node1", "python", "-c", f"import subprocess; subprocess.run({bwrap!r}, check=True)")
