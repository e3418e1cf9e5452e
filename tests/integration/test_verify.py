"""``ipdc mr --verify N``: a worker that lies about its output is caught.

A 4-node swarm in which one node runs a patched IPDC: its runner adds a pair of its own
to every map output, as a dishonest or broken node would. Nothing in the product knows
about the patch; the node is simply running other software. With ``--verify 2`` every
task runs on two peers and the job fails naming the liar and the CIDs each side reported;
with ``--verify 3 --verify-majority`` the honest replicas outvote it and the counts are
exact; with the honest software back, ``--verify 2`` gives exact counts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipdc.node.cluster import LocalCluster
from ipdc.node.lifecycle import Node
from tests.helpers import REPO, read_output, reference_counts, run_cli

pytestmark = pytest.mark.timeout(600)

LIE = "tampered by a liar"
PATCH = f'''

_honest_map_pairs = map_pairs


def map_pairs(module, text, path=""):  # the patch: every map output gains a pair the input never had
    groups = KeyGroups()
    groups.add_pairs([*_honest_map_pairs(module, text, path), ({LIE!r}, 1)], None)
    return groups
'''


@pytest.fixture(scope="module")
def patched_tree() -> Iterator[Path]:
    """A copy of this IPDC whose runner lies. Outside any 0700 directory: a root agent's
    sandboxes run under uids of their own and must read the runner modules they bind."""
    base = Path(tempfile.mkdtemp(prefix="ipdc-liar-", dir="/var/tmp"))
    base.chmod(0o755)
    shutil.copytree(REPO / "ipdc", base / "ipdc", ignore=shutil.ignore_patterns("__pycache__"))
    runner = base / "ipdc" / "runner" / "mapreduce.py"
    runner.write_text(runner.read_text() + PATCH)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(4, base=tmp_path_factory.mktemp("verify")) as cluster:
        yield cluster


def restart_agent(node: Node, pythonpath: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restart the node's agent with ``pythonpath`` first on its path (None: the honest tree)."""
    Node(node.home).services["agent"].stop()
    with monkeypatch.context() as env:
        if pythonpath is None:
            env.delenv("PYTHONPATH", raising=False)
        else:
            env.setenv("PYTHONPATH", pythonpath)
        Node(node.home).start()


def submit(node: Node, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    done = run_cli(["mr", str(tmp_path / "in.txt"), "-q", *args], node.home, check=False, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_a_lying_worker_fails_the_job_by_name_and_a_majority_outvotes_it(
        four: LocalCluster, patched_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    liar = four.nodes[3]
    liar_name = liar.config.node.name
    data = b"alpha beta gamma delta\nbeta gamma\ngamma\n" * 200
    (tmp_path / "in.txt").write_bytes(data)
    submitter = four.nodes[0]
    restart_agent(liar, str(patched_tree), monkeypatch)
    try:
        # without --verify the lie goes through: the patch really changes what the node reports
        code, _, _ = submit(submitter, tmp_path, "--k", "4", "--chunks", "8", "-o", str(tmp_path / "plain"))
        assert code == 0
        counts = read_output(tmp_path / "plain", 4)[0]
        assert counts[LIE.encode()] > 0 and counts != reference_counts(data)

        code, _, stderr = submit(submitter, tmp_path, "--k", "4", "--verify", "2", "--chunks", "8",
                                 "-o", str(tmp_path / "caught"))
        assert code != 0 and "disagree" in stderr and liar_name in stderr, stderr
        assert not (tmp_path / "caught").exists()

        code, stdout, stderr = submit(submitter, tmp_path, "--k", "4", "--verify", "3", "--verify-majority",
                                      "--chunks", "8", "--json", "-o", str(tmp_path / "outvoted"))
        assert code == 0, stderr
        assert read_output(tmp_path / "outvoted", 4)[0] == reference_counts(data)
        assert json.loads(stdout)["verify"] == 3
    finally:
        restart_agent(liar, None, monkeypatch)
    code, _, stderr = submit(submitter, tmp_path, "--k", "4", "--verify", "2", "-o", str(tmp_path / "honest"))
    assert code == 0, stderr
    assert read_output(tmp_path / "honest", 4)[0] == reference_counts(data)


def test_verify_needs_enough_workers(four: LocalCluster, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_bytes(b"x\n")
    code, _, stderr = submit(four.nodes[0], tmp_path, "--k", "2", "--verify", "3")
    assert code != 0 and "--verify 3" in stderr and "--k" in stderr


def test_the_patch_is_outside_the_product() -> None:
    """The liar is other software on one node, not a hook in IPDC."""
    for path in (REPO / "ipdc").rglob("*.py"):
        assert LIE not in path.read_text(), path
