"""Only trusted, signed, fresh jobs run; every other message is logged, dropped and
never answered; and no member can steer another member's job.

A real two-node swarm: node 0 is the trusted submitter, node 1 the agent under
test. Each case publishes raw payloads with node 0's broker credentials (what any
member of the swarm can do) and reads node 1's agent.log for the line that names
the reason. "Never answered" is checked on the job's result topic: an honest
request sent afterwards is answered, and messages from one publisher arrive in
order, so an answer to the bad one would have come first. "No user code ran" is
checked on the file system (no work dir for the job) and in the process table.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipdc.agent.agent import job_dir_name
from ipdc.bus import Bus, client_id
from ipdc.node.cluster import LocalCluster
from ipdc.node.lifecycle import Node
from ipdc.spawn import wait_for
from ipdc.submit.client import SwarmClient
from ipdc.submit.mapreduce import MapReduceController, MapReduceJob
from ipdc.trust import Signer, digest
from ipdc.wire.buffer import Buffer
from ipdc.wire.channel import MAX_PAYLOAD
from ipdc.wire.cleanup import CleanUp
from ipdc.wire.domap import DoMap
from ipdc.wire.download import Download
from ipdc.wire.getresult import GETRESULT, GetResult
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.inbox import INBOX_CHANNELS
from ipdc.wire.manifest import JobManifest
from ipdc.wire.renew import Renew
from ipdc.wire.tf import Tf
from tests.helpers import read_output, reference_counts

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # a worker that never accepts a job is replaced after 3 s instead of 30
    with LocalCluster(2, base=tmp_path_factory.mktemp("security"),
                      settings={"agent": {"ready_timeout": 3.0}}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def code(pair: LocalCluster) -> dict[str, Cid]:
    with pair.nodes[0].kubo() as kubo:
        return {
            # a map task that ran is answered on GetResult with its outputs: proof that it ran
            "Map.py": kubo.add_bytes(b"def map(line):\n    return [(w, 1) for w in line.split()]\n"),
            "Reduce.py": kubo.add_bytes(b"def reduce(key, values):\n    return sum(values)\n"),
        }


class Agent:
    """Node 1's agent as the tests see it: its inbox, its log, its work dirs, its answers."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.node = cluster.nodes[1]
        self.name = self.node.config.node.name
        self.sender = cluster.nodes[0].config
        self.log = self.node.home / "logs" / "agent.log"
        self.mark = 0

    def publish(self, channel: str, payload: bytes) -> None:
        """Send one raw payload; later expect_log calls look only at lines logged after this."""
        self.mark = len(self.log.read_text().splitlines())
        topic = f"ipdc/peer/{self.name}/{channel}"
        with Bus(self.sender.broker, client_id(self.sender.node.name, "test")) as bus:
            bus.connect()
            bus.publish(topic, payload)

    def expect_log(self, *needles: str, timeout: float = 20) -> str:
        """Wait for a log line holding every needle; return it."""
        found: list[str] = []

        def seen() -> bool:
            lines = self.log.read_text().splitlines()[self.mark:]
            found[:] = [line for line in lines if all(n in line for n in needles)]
            return bool(found)
        assert wait_for(seen, timeout, 0.1), f"no log line with {needles}:\n{self.log.read_text()[-3000:]}"
        return found[-1]

    def job_dir(self, submitter: str, job_id: str) -> Path:
        return self.node.work_dir / job_dir_name((submitter, job_id))

    def processes_in(self, job_dir: Path) -> list[int]:
        """Processes working in a job's directory: user code runs there, and only there."""
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cwd").resolve().is_relative_to(job_dir):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    def alive(self) -> bool:
        return self.node.running()


@pytest.fixture()
def agent(pair: LocalCluster) -> Agent:
    return Agent(pair)


class Answers:
    """Node 1's answers on one job's result topic, as node 0 (any member may read results)."""

    def __init__(self, cluster: LocalCluster, job_id: str) -> None:
        self.topic = GETRESULT.topic(node=cluster.nodes[1].config.node.name, job=job_id)
        config = cluster.nodes[0].config
        self.bus = Bus(config.broker, client_id(config.node.name, "answers"))
        self.bus.subscribe(self.topic)
        self.bus.connect()
        self.got: list[GetResult] = []

    def until(self, predicate: Any, timeout: float = 20) -> list[GetResult]:
        def seen() -> bool:
            while not self.bus.inbox.empty():
                self.got.append(GETRESULT.decode(self.bus.inbox.get().payload))
            return any(predicate(r) for r in self.got)
        assert wait_for(seen, timeout, 0.05), f"no such answer on {self.topic}: {self.got}"
        return self.got

    def close(self) -> None:
        self.bus.close()


def manifest_for(code: dict[str, Cid], owner: str, workers: list[str], submitter: str,
                 submitted_at: float | None = None) -> JobManifest:
    return JobManifest(
        job_id=JobId.new(), owner=NodeName(owner), code=dict(code), chunks=[code["Map.py"]], partitions=1,
        workers=[NodeName(w) for w in workers], submitter=submitter,
        **({"submitted_at": submitted_at} if submitted_at is not None else {}),
    )


def encode(message: Any) -> bytes:
    return json.dumps(dataclasses.asdict(message)).encode()


ATTACKER = Signer.generate()


def _forgeries(trusted: Signer, manifest: JobManifest, me: str, other: str,
               ttl: float) -> dict[str, tuple[Download, str]]:
    """name -> (message, the reason the agent must log)."""
    honest = trusted.sign(Download(manifest), "download", me)
    tampered_manifest = dataclasses.replace(manifest,
                                            code={**manifest.code, "Map.py": manifest.code["Reduce.py"]})
    stale = dataclasses.replace(manifest, submitted_at=time.time() - 2 * ttl)
    not_listed = dataclasses.replace(manifest, workers=[NodeName(other)])
    return {
        "unsigned": (Download(manifest), "unsigned"),
        "untrusted key": (ATTACKER.sign(Download(dataclasses.replace(manifest,
                                                                     submitter=ATTACKER.public_key)),
                                        "download", me), "not trusted"),
        # signed by the attacker while claiming the trusted submitter's key
        "forged": (ATTACKER.sign(Download(manifest), "download", me), "does not match"),
        "tampered": (dataclasses.replace(honest, manifest=tampered_manifest), "does not match"),
        "stale": (trusted.sign(Download(stale), "download", me), "stale"),
        # a worker replays the manifest it was sent to another node
        "signed for another node": (trusted.sign(Download(manifest), "download", other),
                                    "replayed from another node"),
        "signed for another channel": (trusted.sign(Download(manifest), "renew", me), "this channel"),
        "not among the workers": (trusted.sign(Download(not_listed), "download", me),
                                  "not among the job's workers"),
    }


@pytest.mark.parametrize("case", ["unsigned", "untrusted key", "forged", "tampered", "stale",
                                  "signed for another node", "signed for another channel",
                                  "not among the workers"])
def test_forged_manifests_are_rejected_unanswered_and_run_nothing(pair: LocalCluster, code: dict[str, Cid],
                                                                  agent: Agent, case: str) -> None:
    trusted = pair.nodes[0].signer
    owner = pair.nodes[0].config.node.name
    manifest = manifest_for(code, owner, [agent.name], trusted.public_key)
    message, reason = _forgeries(trusted, manifest, agent.name, owner,
                                 agent.node.config.agent.manifest_ttl)[case]
    answers = Answers(pair, manifest.job_id)
    try:
        agent.publish("download", encode(message))
        assert reason in agent.expect_log("rejected download of job", message.manifest.job_id)
        # the job is unknown, so a DoMap for it runs nothing either
        agent.publish("domap", encode(trusted.sign(DoMap(message.manifest.job_id, 0), "domap", agent.name)))
        agent.expect_log("ignored domap 0", message.manifest.job_id, "unknown")
        job_dir = agent.job_dir(trusted.public_key, message.manifest.job_id)
        assert not job_dir.exists() and agent.processes_in(job_dir) == []
        # never answered: an honest Download for the same job id is, and it answers first
        fresh = dataclasses.replace(manifest, nonce=secrets.token_hex(16), submitted_at=time.time())
        honest = trusted.sign(Download(fresh), "download", agent.name)
        agent.publish("download", encode(honest))
        got = answers.until(lambda r: r.kind == "ready")
        assert [(r.kind, r.re) for r in got] == [("ready", digest(honest))]
        agent.publish("cleanup", encode(trusted.sign(CleanUp(manifest.job_id), "cleanup", agent.name)))
        agent.expect_log("dropped job", manifest.job_id)
    finally:
        answers.close()
    assert agent.alive()


def test_replayed_manifest_is_rejected_even_after_an_agent_restart(pair: LocalCluster, code: dict[str, Cid],
                                                                   agent: Agent) -> None:
    trusted = pair.nodes[0].signer
    manifest = manifest_for(code, pair.nodes[0].config.node.name, [agent.name], trusted.public_key)
    honest = encode(trusted.sign(Download(manifest), "download", agent.name))
    agent.publish("download", honest)
    job_dir = agent.job_dir(trusted.public_key, manifest.job_id)
    assert wait_for(lambda: (job_dir / "Map.py").exists(), 20), "the honest job was not downloaded"
    agent.publish("cleanup", encode(trusted.sign(CleanUp(manifest.job_id), "cleanup", agent.name)))
    assert wait_for(lambda: not job_dir.exists(), 20)
    answers = Answers(pair, str(manifest.job_id))
    try:
        agent.publish("download", honest)  # the same bytes again: a replay, refused unanswered
        assert "replayed" in agent.expect_log("rejected download of job", manifest.job_id)
        # the submitter asking afresh (a controller resumed after the job ended here) is told why
        again = trusted.sign(Download(manifest.reissued([NodeName(agent.name)])), "download", agent.name)
        agent.publish("download", encode(again))
        got = answers.until(lambda r: r.kind == "error")
        assert [(r.kind, r.phase, r.re) for r in got] == [("error", "download", digest(again))]
        assert "its submitter cleaned it up" in got[0].error
    finally:
        answers.close()

    node = Node(agent.node.home)
    node.stop()
    node.start()
    agent.publish("download", honest)  # a fresh agent remembers the nonce
    assert "replayed" in agent.expect_log("rejected download of job", manifest.job_id)
    assert not job_dir.exists()


def test_another_member_cannot_steer_a_job(pair: LocalCluster, code: dict[str, Cid], agent: Agent) -> None:
    """A job is keyed by its submitter's key: messages signed by any other key, even a trusted
    one, reach no job of theirs; a signed message moved to another channel fails its signature."""
    trusted = pair.nodes[0].signer
    manifest = manifest_for(code, pair.nodes[0].config.node.name, [agent.name], trusted.public_key)
    job = manifest.job_id
    answers = Answers(pair, job)
    agent.publish("download", encode(trusted.sign(Download(manifest), "download", agent.name)))
    job_dir = agent.job_dir(trusted.public_key, job)
    assert wait_for(lambda: (job_dir / "Map.py").exists(), 20)
    other = pair.nodes[1].signer  # trusted by node 1 (it is its own key), but not this job's submitter
    renew = trusted.sign(Renew(job), "renew", agent.name)
    cases = [
        ("domap", encode(other.sign(DoMap(job, 0), "domap", agent.name)), "ignored domap 0", "unknown"),
        ("buffer", encode(other.sign(Buffer(job, 0, 0, code["Map.py"]), "buffer", agent.name)),
         "ignored buffer 0->0", "unknown"),
        ("cleanup", encode(other.sign(CleanUp(job), "cleanup", agent.name)), "refused cleanup", "unknown"),
        ("renew", encode(other.sign(Renew(job), "renew", agent.name)), "ignored renew", "unknown"),
        ("tf", encode(other.sign(Tf("stop", job), "tf", agent.name)), "refused tf stop", "unknown"),
        ("domap", encode(DoMap(job, 0)), "rejected domap 0", "unsigned"),
        ("buffer", encode(ATTACKER.sign(Buffer(job, 0, 0, code["Map.py"]), "buffer", agent.name)),
         "rejected buffer 0->0", "not trusted"),
        ("cleanup", encode(dataclasses.replace(renew)), "rejected cleanup", "this channel"),
    ]
    try:
        for channel, payload, what, reason in cases:
            agent.publish(channel, payload)
            assert reason in agent.expect_log(what, job)
        assert job_dir.exists() and "map" not in {r.kind for r in answers.until(lambda r: r.kind == "ready")}
        agent.publish("domap", encode(trusted.sign(DoMap(job, 0), "domap", agent.name)))  # the submitter's own
        answers.until(lambda r: r.kind == "map")
    finally:
        answers.close()
    agent.publish("cleanup", encode(trusted.sign(CleanUp(job), "cleanup", agent.name)))
    assert wait_for(lambda: not job_dir.exists(), 20)


def _bad_messages(signer: Signer, code: dict[str, Cid], owner: str,
                  me: str) -> list[tuple[str, str, bytes, str]]:
    """(case, channel, payload, what the log line says) for every inbox channel."""
    unknown = JobId.new()
    cases: list[tuple[str, str, bytes, str]] = []
    for name in INBOX_CHANNELS:
        cases += [
            ("malformed JSON", name, b'{"job_id": "', "dropped"),
            ("not UTF-8", name, b"\xff\xfe\xfd", "dropped"),
            ("wrong types", name, b'{"job_id": 5, "task": "x", "manifest": [], "op": 1}', "dropped"),
            ("huge", name, b'{"job_id": "' + b"a" * MAX_PAYLOAD + b'"}', "dropped"),
            ("a list", name, b"[1, 2, 3]", "dropped"),
            ("NaN", name, b'{"job_id": NaN}', "dropped"),
            ("deep", name, b"[" * 50_000 + b"]" * 50_000, "dropped"),
            ("5000 digits", name, b'{"task": ' + b"9" * 5000 + b"}", "dropped"),
        ]
    manifest = manifest_for(code, owner, [me], signer.public_key)
    traversal = dataclasses.replace(manifest, code={"../../evil.py": code["Map.py"]})
    absolute = dataclasses.replace(manifest, job_id=JobId.new(), code={"/etc/evil.py": code["Map.py"]})
    python_map = {"kind": "python", "file": "Map.py"}
    not_shipped = dataclasses.replace(manifest, job_id=JobId.new(), params={"stages": {
        "map": {"kind": "command", "argv": ["./evil"], "shipped": True}, "reduce": python_map}})
    shell = dataclasses.replace(manifest, job_id=JobId.new(), params={"stages": {
        "map": {"kind": "shell", "argv": ["rm -rf /"]}, "reduce": python_map}})
    bad_cid = json.loads(encode(signer.sign(Download(manifest), "download", me)))
    bad_cid["manifest"]["code"]["Map.py"] = "not-a-cid;rm -rf /"
    bad_job = json.loads(encode(signer.sign(DoMap(unknown, 0), "domap", me)))
    bad_job["job_id"] = "../../../etc"
    cases += [
        ("../ file name", "download", encode(signer.sign(Download(traversal), "download", me)),
         "unsafe file name"),
        ("absolute file name", "download", encode(signer.sign(Download(absolute), "download", me)),
         "unsafe file name"),
        ("shipped program not in the job", "download", encode(signer.sign(Download(not_shipped), "download", me)),
         "job stages: malformed map stage"),
        ("unknown kind of stage", "download", encode(signer.sign(Download(shell), "download", me)),
         "job stages: malformed map stage {'kind': 'shell'"),
        ("invalid CID", "download", json.dumps(bad_cid).encode(), "dropped"),
        ("../ job id", "domap", json.dumps(bad_job).encode(), "dropped"),
        ("unknown job", "domap", encode(signer.sign(DoMap(unknown, 0), "domap", me)), "unknown"),
        ("unknown job", "buffer", encode(signer.sign(Buffer(unknown, 0, 0, code["Map.py"]), "buffer", me)),
         "unknown"),
        ("unknown job", "cleanup", encode(signer.sign(CleanUp(unknown), "cleanup", me)), "refused cleanup"),
        ("unknown op", "tf", b'{"op": "port", "cluster_id": "' + unknown.encode() + b'"}', "dropped"),
        ("unknown channel", "no-such-channel", b"{}", "unknown topic"),
    ]
    return cases


def test_bad_messages_on_every_channel_are_logged_and_survived(pair: LocalCluster, code: dict[str, Cid],
                                                               agent: Agent, tmp_path: Path) -> None:
    signer = pair.nodes[0].signer
    cases = _bad_messages(signer, code, pair.nodes[0].config.node.name, agent.name)
    before = agent.log.read_text().splitlines()
    for _, channel, payload, _ in cases:
        agent.publish(channel, payload)

    def logged() -> bool:
        return len(agent.log.read_text().splitlines()) >= len(before) + len(cases)
    assert wait_for(logged, 30, 0.1), agent.log.read_text()[-3000:]
    new = "\n".join(agent.log.read_text().splitlines()[len(before):])
    for case, channel, _, expected in cases:
        assert expected in new, f"{case} on {channel}: no log line with {expected!r}"
    assert new.count("dropped") >= 8 * len(INBOX_CHANNELS)
    assert not any(p.name.startswith("..") for p in agent.node.home.iterdir())
    assert not Path("/etc/evil.py").exists()
    assert agent.processes_in(agent.node.work_dir) == [] and agent.alive()
    assert "Traceback" not in new
    # and the agent still serves: a real job runs on both nodes with exact counts
    data = b"to be or not to be\nthat is the question\n" * 50
    (tmp_path / "in.txt").write_bytes(data)
    job = MapReduceJob(input=tmp_path / "in.txt", k=2, output=tmp_path / "out")
    config = pair.nodes[0].config
    with SwarmClient(config, signer).connect() as client, pair.nodes[0].kubo() as kubo:
        result = MapReduceController(client, kubo, job, pair.nodes[0].home).run()
    assert agent.name in {w["name"] for w in result.workers}
    assert read_output(result.output, 2)[0] == reference_counts(data)


def test_broker_acl_keeps_a_node_from_speaking_or_reading_for_another(pair: LocalCluster) -> None:
    """Node 1's credentials cannot fake node 0's presence or results, nor read node 0's inbox.

    Messages from one publisher arrive in order, so once a control message sent after
    the forgeries has arrived, any forgery the broker let through would have too.
    """
    me, other = pair.nodes[1].config, pair.nodes[0].config
    job = JobId.new()
    with Bus(other.broker, client_id(other.node.name, "watch")) as watcher, \
            Bus(me.broker, client_id(me.node.name, "spy")) as spy:
        watcher.subscribe(f"ipdc/presence/{other.node.name}", f"ipdc/result/+/{job}")
        watcher.connect()
        spy.subscribe(f"ipdc/peer/{other.node.name}/#", f"ipdc/peer/{me.node.name}/probe")
        spy.connect()
        spy.publish(f"ipdc/presence/{other.node.name}", b"forged presence")
        spy.publish(f"ipdc/result/{other.node.name}/{job}", b"forged result")
        spy.publish(f"ipdc/result/{me.node.name}/{job}", b"control")
        watcher.publish(f"ipdc/peer/{other.node.name}/probe", b"secret")
        watcher.publish(f"ipdc/peer/{me.node.name}/probe", b"control")
        seen: dict[str, list[tuple[str, bytes]]] = {"watcher": [], "spy": []}

        def got_controls() -> bool:
            for name, bus in (("watcher", watcher), ("spy", spy)):
                while not bus.inbox.empty():
                    message = bus.inbox.get()
                    seen[name].append((message.topic, message.payload))
            return all(any(p == b"control" for _, p in seen[n]) for n in seen)
        assert wait_for(got_controls, 20), seen
    assert [p for _, p in seen["watcher"] if p.startswith(b"forged")] == []
    assert [t for t, _ in seen["spy"] if t.startswith(f"ipdc/peer/{other.node.name}/")] == []


SLOW_MAP = "import time\n\ndef map(line):\n    time.sleep(0.2)\n    return [(w, 1) for w in line.split()]\n"


def test_forged_requests_and_replies_during_a_job_remove_no_worker(pair: LocalCluster,
                                                                   tmp_path: Path) -> None:
    """While a job runs, a member floods its worker with unsigned Downloads for the job (which,
    answered, used to make the submitter drop the worker) and publishes error replies for the
    job on its own result topic, which answer no request of the submitter: the job loses no
    worker and its counts are exact."""
    submitter, member = pair.nodes[0], pair.nodes[1]
    data = b"alpha beta gamma\nbeta gamma\ngamma\n" * 10
    (tmp_path / "in.txt").write_bytes(data)
    (tmp_path / "Map.py").write_text(SLOW_MAP)
    job = MapReduceJob(input=tmp_path / "in.txt", k=2, map_file=tmp_path / "Map.py", output=tmp_path / "out")
    stop = threading.Event()
    with SwarmClient(submitter.config, submitter.signer).connect() as client, \
            submitter.kubo() as kubo:
        controller = MapReduceController(client, kubo, job, submitter.home)
        job_id = controller.job_id
        me = member.config.node.name

        def attack() -> None:
            unsigned = JobManifest(job_id=job_id, owner=NodeName(submitter.config.node.name),
                                   code={"Map.py": Cid(
                                       "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")},
                                   chunks=[], partitions=2, workers=[NodeName(me)])
            with Bus(member.config.broker, client_id(me, "attack")) as bus:
                bus.connect()
                while not stop.is_set():
                    for name in (me, submitter.config.node.name):
                        bus.publish(f"ipdc/peer/{name}/download", encode(Download(unsigned)))
                    forged = GetResult(job_id, NodeName(me), "error", phase="download", error="refused",
                                       re="0" * 32)
                    bus.publish(GETRESULT.topic(node=me, job=job_id), GETRESULT.encode(forged))
                    stop.wait(0.05)

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        try:
            result = controller.run()
        finally:
            stop.set()
            attacker.join()
    assert result.lost == [] and len(result.workers) == 2
    assert read_output(result.output, 2)[0] == reference_counts(data)


def test_a_worker_that_does_not_trust_the_submitter_is_replaced(pair: LocalCluster, tmp_path: Path) -> None:
    """A node refuses a job from a key it does not trust and says nothing to the submitter
    (an answer would let any member make a worker speak); after agent.ready_timeout the
    submitter goes on without it (here the submitter's own node takes over)."""
    submitter, refuser = pair.nodes[1], pair.nodes[0]
    key = submitter.signer.public_key
    assert refuser.trust.remove(key)
    try:
        data = b"one two two three three three\n" * 20
        (tmp_path / "in.txt").write_bytes(data)
        job = MapReduceJob(input=tmp_path / "in.txt", k=2, output=tmp_path / "out")
        with SwarmClient(submitter.config, submitter.signer).connect() as client, \
                submitter.kubo() as kubo:
            result = MapReduceController(client, kubo, job, submitter.home).run()
    finally:
        refuser.trust.add(key, submitter.config.node.name)
    assert result.lost == [refuser.config.node.name]
    assert read_output(result.output, 2)[0] == reference_counts(data)
    assert f"ipdc trust add {key}" in (refuser.home / "logs" / "agent.log").read_text()


def test_user_code_cannot_see_the_nodes_secrets(pair: LocalCluster, tmp_path: Path) -> None:
    """User code runs in a sandbox whose mount namespace holds no part of the node's home:
    not the broker password (ipdc.conf), the keys, the trusted list, the kubo repo or other
    jobs' files. It sees /usr, its Python, IPDC's runner modules and its own /job. (The
    hostile suite, tests/integration/test_hostile.py, tries the other ways in.)"""
    home = pair.nodes[0].home
    probe = tmp_path / "Map.py"
    probe.write_text(
        "import os\n\n"
        f"HOME = {str(home)!r}\n"
        "SECRETS = ('ipdc.conf', 'keys/submitter.key', 'keys/kubo-api.secret', 'trusted_keys', 'kubo/swarm.key')\n\n"
        "def map_chunk(text):\n"
        "    readable = [p for p in SECRETS if os.path.exists(os.path.join(HOME, p))]\n"
        "    return {'cwd:' + os.getcwd(): 1, 'root:' + ','.join(sorted(os.listdir('/'))): 1,\n"
        "            'home:' + str(os.path.exists(HOME)): 1, 'readable:' + ','.join(readable): 1,\n"
        "            'own code:' + str(os.path.exists('Map.py')): 1}.items()\n")
    (tmp_path / "in.txt").write_text("x\n")
    job = MapReduceJob(input=tmp_path / "in.txt", k=2, map_file=probe, output=tmp_path / "out")
    config = pair.nodes[0].config
    with SwarmClient(config, pair.nodes[0].signer).connect() as client, pair.nodes[0].kubo() as kubo:
        result = MapReduceController(client, kubo, job, home).run()
    keys = {key.decode() for key in read_output(result.output, 2)[0]}
    root = next(k for k in keys if k.startswith("root:")).removeprefix("root:").split(",")
    assert keys - {f"root:{','.join(root)}"} == {"cwd:/job", "home:False", "readable:", "own code:True"}
    python_top = {Path(p).parts[1] for p in (sys.base_prefix, "/opt/ipdc-python")}  # its interpreter's top dir
    assert set(root) <= {"bin", "dev", "etc", "ipdc", "job", "lib", "lib64", "proc", "sbin", "tmp", "usr"} | python_top
