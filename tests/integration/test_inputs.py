"""Issue 14, item 5: data by CID, on a real 3-node swarm.

INPUT is a local file, a local directory, a CID, or /ipfs/CID/path; a map(line, path)
learns each line's file; ``--print-cid`` chains jobs. Counts are checked against
independent references computed here from the raw bytes (collections.Counter), never
against IPDC's own code. Inputs given by CID are added on another node than the
submitting one, so they reach the workers by bitswap.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ipdc.node.cluster import LocalCluster
from ipdc.node.lifecycle import Node
from tests.helpers import read_output, reference_counts, run_cli

#: An inverted index: word -> the sorted files it occurs in.
INDEX_MAP = "def map(line, path):\n    for word in set(line.split()):\n        yield word, path\n"
INDEX_REDUCE = "def reduce(word, paths):\n    return sorted(set(paths))\n"
#: Over the index's parts: word -> number of files it occurs in.
DOCS_MAP = ("import json\n\ndef map(line):\n    word, _, paths = line.rpartition('\\t')\n"
            "    yield word, len(json.loads(paths))\n")

FILES = {
    "docs/a.txt": "the cat sat on the mat\nthe dog\n" * 300,
    "docs/sub/b.txt": "a dog and a cat\nüber straße\n" * 500,
    "c.txt": "the end\n\nmat mat mat\n" * 200,
    "empty.txt": "",
}


def make_tree(root: Path) -> dict[str, bytes]:
    """The test's input directory, plus a hidden file that must not be read."""
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / ".hidden").write_text("secret secret secret\n")
    return {rel: text.encode() for rel, text in FILES.items()}


def ipfs_add(node: Node, path: Path) -> str:
    """``ipfs add -r`` with IPDC's import settings, by the node's own kubo (pinned)."""
    secret = node.kubo_secret_file.read_text().strip()
    done = subprocess.run(["ipfs", "--api-auth", f"bearer:{secret}", "add", "-r", "-Q", "--cid-version=1",
                           "--raw-leaves", str(path)], env=node.kubo_env(), capture_output=True, text=True,
                          check=True, timeout=60)
    return done.stdout.strip()


def mr(node: Node, args: list[str]) -> dict[str, Any]:
    done = run_cli(["mr", "--json", *args], node.home)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_directory_cid_and_ipfs_path_inputs_count_like_the_local_file(swarm: LocalCluster,
                                                                      tmp_path: Path) -> None:
    submitter, holder = swarm.nodes[0], swarm.nodes[2]
    tree = make_tree(tmp_path / "in")
    whole = b"".join(tree.values())
    single = tmp_path / "whole.txt"
    single.write_bytes(whole)
    expected = reference_counts(whole)

    from_file = mr(submitter, ["--k", "3", str(single), "-o", str(tmp_path / "o-file")])
    assert read_output(Path(from_file["output"]), 3)[0] == expected

    from_dir = mr(submitter, ["--k", "3", str(tmp_path / "in"), "-o", str(tmp_path / "o-dir")])
    assert read_output(Path(from_dir["output"]), 3)[0] == expected
    assert from_dir["input_bytes"] == len(whole)  # .hidden is left out, as ipfs add -r leaves it

    root = ipfs_add(holder, tmp_path / "in")
    assert from_dir["input_cid"] == root  # the CID computed on the submitter is kubo's
    with holder.kubo() as kubo:
        file_cids = {str(cid) for cid in kubo.ls(root).values()}
        file_cids |= {str(cid) for cid in kubo.ls(kubo.resolve(f"/ipfs/{root}/docs", 10)).values()}
        file_cids |= {str(cid) for cid in kubo.ls(kubo.resolve(f"/ipfs/{root}/docs/sub", 10)).values()}

    by_cid = mr(submitter, ["--k", "3", root, "--no-cache", "-o", str(tmp_path / "o-cid")])
    assert read_output(Path(by_cid["output"]), 3)[0] == expected
    assert by_cid["cached"] is False and by_cid["input_cid"] == root
    assert by_cid["cache_key"] == from_dir["cache_key"]  # the same input, however it is given
    assert set(by_cid["chunks"]) <= file_cids  # byte ranges of the input's own files: nothing added again

    docs = mr(submitter, ["--k", "3", f"/ipfs/{root}/docs", "-o", str(tmp_path / "o-docs")])
    assert read_output(Path(docs["output"]), 3)[0] == reference_counts(tree["docs/a.txt"]
                                                                       + tree["docs/sub/b.txt"])
    one = mr(submitter, ["--k", "2", f"/ipfs/{root}/docs/sub/b.txt", "-o", str(tmp_path / "o-one")])
    assert read_output(Path(one["output"]), 2)[0] == reference_counts(tree["docs/sub/b.txt"])


def test_an_inverted_index_chained_by_cid_into_a_count_is_exact(swarm: LocalCluster, tmp_path: Path) -> None:
    submitter = swarm.nodes[1]
    tree = make_tree(tmp_path / "in")
    (tmp_path / "IndexMap.py").write_text(INDEX_MAP)
    (tmp_path / "IndexReduce.py").write_text(INDEX_REDUCE)
    (tmp_path / "DocsMap.py").write_text(DOCS_MAP)
    index: dict[str, set[str]] = defaultdict(set)
    for rel, data in tree.items():
        for word in data.decode().split():
            index[word].add(rel)

    first = run_cli(["mr", "--k", "3", "--map", str(tmp_path / "IndexMap.py"), "--reduce",
                     str(tmp_path / "IndexReduce.py"), str(tmp_path / "in"), "--print-cid",
                     "-o", str(tmp_path / "index")], submitter.home)
    index_cid = first.stdout.strip()
    assert index_cid.startswith("bafy") and "\n" not in index_cid  # only the CID
    got = {}
    for part in sorted((tmp_path / "index").glob("part-*")):
        for line in part.read_text().splitlines():
            word, _, paths = line.rpartition("\t")
            got[word] = json.loads(paths)
    assert got == {word: sorted(paths) for word, paths in index.items()}

    second = mr(submitter, ["--k", "2", "--map", str(tmp_path / "DocsMap.py"), index_cid,
                            "-o", str(tmp_path / "docs")])
    assert second["input_cid"] == index_cid
    assert read_output(Path(second["output"]), 2)[0] == Counter(
        {word.encode(): len(paths) for word, paths in index.items()})

    # The first job's output directory read as a local input is its parts alone (not
    # job.json, not _SUCCESS): the same input CID, so the cache already has the answer.
    again = mr(submitter, ["--k", "2", "--map", str(tmp_path / "DocsMap.py"), str(tmp_path / "index"),
                           "-o", str(tmp_path / "docs-again")])
    assert again["input_cid"] == index_cid and again["cached"] is True
    assert again["result_cid"] == second["result_cid"]
