"""The Python API (ipdc.api) on real agents: three nodes (the session ``swarm``), kubo and
mosquitto, nothing mocked. Results are checked against the same functions run here."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ipdc
from ipdc.api import Swarm
from ipdc.errors import JobError, NotEnoughPeers, ValueRefused
from ipdc.node.cluster import LocalCluster
from ipdc.spawn import wait_for
from ipdc.trust import Signer


@pytest.fixture(scope="module")
def api(swarm: LocalCluster) -> Iterator[Swarm]:
    """A session on node 0 of the shared three-node swarm."""
    with Swarm(swarm.nodes[0].home) as session:
        yield session


def agent_log(node_home: Path) -> str:
    return (node_home / "logs" / "agent.log").read_text()


def collatz(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def test_submit_runs_a_function_with_arguments_on_a_peer(api: Swarm, swarm: LocalCluster) -> None:
    future = api.submit(lambda a, b, scale=1: (a + b) * scale, 40, 2, scale=10)
    assert future.result(timeout=60) == 420
    assert future.peer in {n.config.node.name for n in swarm.nodes}
    # values keep their types through msgpack: a tuple stays a tuple, bytes stay bytes
    shaped = api.submit(lambda: {"t": (1, "x"), "b": b"\x00\xff", "f": 0.5, "n": None})
    assert shaped.result(timeout=60) == {"t": (1, "x"), "b": b"\x00\xff", "f": 0.5, "n": None}


def test_placement_honours_pins_and_resources(api: Swarm, swarm: LocalCluster) -> None:
    for node in swarm.nodes:
        name = node.config.node.name
        assert api.submit(abs, -1, peer=name).peer == name
    with pytest.raises(NotEnoughPeers, match="not live"):
        api.submit(abs, -1, peer="n-nowhere").result(timeout=10)
    with pytest.raises(NotEnoughPeers, match="no live peer offering"):
        api.submit(abs, -1, resources={"mem_mb": 10**9}).result(timeout=10)
    roomy = api.submit(abs, -1, resources={"mem_mb": 1, "cores": 1})
    assert roomy.result(timeout=60) == 1


def test_map_of_a_thousand_items_is_ordered_and_exact(api: Swarm, swarm: LocalCluster) -> None:
    items = list(range(1, 1001))
    assert list(api.map(collatz, items)) == [collatz(n) for n in items]
    assert list(api.map(math.isqrt, items[:50], chunksize=1)) == [math.isqrt(n) for n in items[:50]]


def test_a_remote_exception_is_reraised_with_the_workers_traceback_and_peer(api: Swarm) -> None:
    def parse(text: str) -> int:
        return int(text)

    future = api.submit(parse, "not a number")
    with pytest.raises(ValueError, match="invalid literal") as raised:
        future.result(timeout=60)
    note = "\n".join(raised.value.__notes__)
    assert f"raised on peer {future.peer}" in note
    assert "in parse" in note and "ValueError: invalid literal" in note


def test_as_completed_yields_every_future(api: Swarm) -> None:
    futures = [api.submit(pow, 2, n) for n in range(20)]
    done = {f.task_id for f in ipdc.as_completed(futures, timeout=60)}
    assert done == {f.task_id for f in futures}
    assert sorted(f.result() for f in futures) == [2 ** n for n in range(20)]


def test_a_submitter_the_agents_do_not_trust_is_refused_and_runs_nothing(swarm: LocalCluster) -> None:
    stranger = Signer.generate()
    with Swarm(swarm.nodes[0].home, signer=stranger) as session:
        future = session.submit(collatz, 27)
        target = next(n for n in swarm.nodes if n.config.node.name == future.peer)
        assert wait_for(lambda: stranger.public_key in agent_log(target.home), 30)
        line = next(x for x in agent_log(target.home).splitlines() if stranger.public_key in x)
        assert f"rejected task {future.task_id}" in line and "not trusted" in line
        with pytest.raises(TimeoutError):
            future.result(timeout=2)  # refused messages are never answered


def test_a_pickled_result_is_taken_only_from_a_worker_whose_key_is_trusted(api: Swarm,
                                                                         swarm: LocalCluster) -> None:
    submitter, trusted, untrusted = swarm.nodes
    key = untrusted.signer.public_key
    assert submitter.trust.remove(key)
    try:
        # a set: only a pickle holds it
        refused = api.submit(lambda: {1, 2, 3}, peer=untrusted.config.node.name)
        with pytest.raises(ValueRefused, match="not trusted here"):
            refused.result(timeout=60)
        plain = api.submit(lambda: [1, 2, 3], peer=untrusted.config.node.name)
        assert plain.result(timeout=60) == [1, 2, 3]  # plain data decodes without running code
        accepted = api.submit(lambda: {1, 2, 3}, peer=trusted.config.node.name)
        assert accepted.result(timeout=60) == {1, 2, 3}
    finally:
        submitter.trust.add(key, untrusted.config.node.name)


def test_a_diamond_graph_moves_results_worker_to_worker_never_through_the_submitter(
        api: Swarm, swarm: LocalCluster) -> None:
    import numpy

    submitter, one, two = swarm.nodes
    first, second = one.config.node.name, two.config.node.name

    def source(n: int) -> numpy.ndarray:
        return numpy.arange(n, dtype=numpy.float64)  # 2 MB: too large to travel inline

    def scale(a: numpy.ndarray, k: float) -> numpy.ndarray:
        return a * k

    def total(b: numpy.ndarray, c: numpy.ndarray) -> float:
        return float(b.sum() + c.sum())

    n = 250_000
    a = api.submit(source, n, peer=first)
    b = api.submit(scale, a, 2.0, peer=second)
    c = api.submit(scale, a, 3.0, peer=first)
    d = api.submit(total, b, c, peer=second)
    expected = float((numpy.arange(n) * 2.0).sum() + (numpy.arange(n) * 3.0).sum())
    assert d.result(timeout=120) == expected
    intermediate = [f.stored() for f in (a, b, c)]
    assert all(s.cid is not None and s.data is None for s in intermediate)  # by CID, not inline
    kubo = submitter.kubo()
    assert not any(kubo.has(str(s.cid)) for s in intermediate)  # the submitter never held them
    # b ran on `second` and fetched a's result from `first`; d fetched b's locally and c's from `first`
    assert f"task input {intermediate[0].cid} fetched" in agent_log(two.home)
    assert f"task input {intermediate[2].cid} fetched" in agent_log(two.home)
    assert (a.result() == numpy.arange(n)).all()  # fetched now, because it was asked for
    assert kubo.has(str(intermediate[0].cid))


def test_a_large_argument_is_stored_once_and_fetched_once_per_node(api: Swarm, swarm: LocalCluster) -> None:
    import numpy

    from ipdc.runner.pytask import encode
    from ipdc.wire.unixfs import cid_of

    array = numpy.random.default_rng(7).random(50 * 2**20 // 8)  # 50 MB
    cid = cid_of(encode(array)[1])
    futures = [api.submit(lambda x, i: float(x[i::1000].sum()), array, i) for i in range(20)]
    assert [f.result(timeout=300) for f in futures] == [float(array[i::1000].sum()) for i in range(20)]
    workers = {f.peer for f in futures}
    for node in swarm.nodes:
        fetches = agent_log(node.home).count(f"task input {cid} fetched")
        assert fetches == (1 if node.config.node.name in workers else 0), node.config.node.name
    assert len(workers) >= 2
    assert cid in swarm.nodes[0].kubo().pins()  # stored once, pinned while the session lasts


def test_closing_a_session_unpins_its_inputs(swarm: LocalCluster) -> None:
    from ipdc.runner.pytask import encode
    from ipdc.wire.unixfs import cid_of

    data = bytes(range(256)) * 1024  # 256 KiB: by CID
    cid = cid_of(encode(data)[1])
    with Swarm(swarm.nodes[0].home) as session:
        assert session.submit(len, data).result(timeout=60) == len(data)
        assert cid in swarm.nodes[0].kubo().pins()
    assert cid not in swarm.nodes[0].kubo().pins()


def spin(seconds: float) -> int:
    """CPU work for about ``seconds``, then how many loops it made: the heavy function."""
    end, loops = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        loops += 1
    return loops


def hold(seconds: float) -> None:
    """Keep a runner busy for ``seconds`` (the load of the offloading test)."""
    time.sleep(seconds)


def test_offload_sends_a_heavy_call_away_from_a_loaded_node(api: Swarm, swarm: LocalCluster) -> None:
    me = swarm.nodes[0].config.node.name
    first = api.offload(spin, 1.0, policy="remote")  # measures its run time
    assert first.result(timeout=60) > 0 and first.peer != me
    api.submit(hold, 0, peer=first.peer).result(timeout=60)  # the round trip (a session's first task is not one)
    blockers = [api.submit(hold, 600, peer=me) for _ in range(swarm.nodes[0].config.slots)]
    try:
        def loaded_here_only() -> bool:  # this node's heartbeat says busy, the others' idle
            return all(p.running >= swarm.nodes[0].config.slots if p.name == me else p.running == 0
                       for p in api.client.peers.live())

        assert wait_for(loaded_here_only, 30), api.client.peers.live()
        future = api.offload(spin, 1.0)
        assert future.result(timeout=60) > 0
        decision = api.decisions[-1]
        assert decision.choice not in ("local", me) and future.peer == decision.choice, decision.estimates
        local = next(e for e in decision.estimates if e.where == "local")
        chosen = next(e for e in decision.estimates if e.where == decision.choice)
        assert local.wait >= local.run > 0.3 and chosen.total < local.total
        assert "run" not in chosen.assumed  # measured by the first call
        measured = next(e for e in decision.estimates if e.where == first.peer)
        assert "rtt" not in measured.assumed and 0 < measured.transfer < 1
    finally:
        for blocker in blockers:
            blocker.cancel()


def test_offload_keeps_a_tiny_call_with_a_large_argument_here_and_records_it(
        api: Swarm, swarm: LocalCluster) -> None:
    import json

    import numpy

    from tests.helpers import run_cli

    def first_item(a: numpy.ndarray) -> float:
        return float(a[0])

    assert api.offload(first_item, numpy.ones(4)).result(timeout=60) == 1.0  # measured here
    big = numpy.full(20 * 2**20 // 8, 2.0)  # 20 MB
    future = api.offload(first_item, big)
    assert future.result(timeout=60) == 2.0 and future.peer == "local"
    decision = api.decisions[-1]
    assert decision.choice == "local" and decision.arg_bytes >= big.nbytes
    remote = [e for e in decision.estimates if e.where != "local"]
    assert len(remote) == 2 and all(e.transfer > 0.1 for e in remote)
    home = swarm.nodes[0].home

    def recorded() -> list[dict[str, object]]:
        rows = json.loads(run_cli(["jobs", "--json", "--all"], home).stdout)
        return [r for r in rows
                if r["kind"] == "offload" and r["params"]["decided_at"] == decision.decided_at]
    assert wait_for(lambda: len(recorded()) == 1, 30)
    row = recorded()[0]
    assert row["state"] == "succeeded" and row["workers"] == [["local"]]
    assert {e["where"] for e in row["params"]["estimates"]} == {e.where for e in decision.estimates}
    assert all({"run", "wait", "transfer", "total", "assumed"} <= set(e) for e in row["params"]["estimates"])
    assert "estimated local" in run_cli(["jobs"], home).stdout


def test_mapreduce_runs_the_mr_engine_with_functions(api: Swarm, tmp_path: Path) -> None:
    from tests.helpers import read_output, reference_counts

    text = "".join(f"w{i % 37} w{i % 11} {'x' * (i % 5)}\n" for i in range(5000))
    source = tmp_path / "words.txt"
    source.write_text(text)

    def words(line: str) -> list[tuple[str, int]]:
        return [(w, 1) for w in line.split()]

    result = api.mapreduce(words, lambda key, counts: sum(counts), source, k=3,
                           combine=lambda key, counts: sum(counts), output=tmp_path / "out")
    counts, _ = read_output(result.output, 3)
    assert counts == reference_counts(text.encode())
    assert len(result.parts) == 3 and result.result_cid and (result.output / "_SUCCESS").exists()
    with pytest.raises(JobError, match="k and max_attempts must be at least 1, not k=0"):
        api.mapreduce(words, lambda key, counts: sum(counts), source, k=0, output=tmp_path / "out0")
    assert not (tmp_path / "out0").exists()


def test_the_executor_serves_code_written_for_concurrent_futures(api: Swarm) -> None:
    with api.executor() as pool:
        assert list(pool.map(pow, [2, 3, 4], [5, 2, 0])) == [32, 9, 1]
        assert list(pool.map(abs, range(-5, 5), chunksize=3)) == [abs(n) for n in range(-5, 5)]
        assert pool.submit(divmod, 17, 5).result(timeout=60) == (3, 2)


def test_a_replayed_or_tampered_task_is_refused_and_unanswered(api: Swarm, swarm: LocalCluster) -> None:
    import base64
    import dataclasses
    import queue

    from ipdc.runner.pytask import encode
    from ipdc.wire.ids import JobId
    from ipdc.wire.task import TASK, TASK_REPLY, Task, TaskArg

    worker = swarm.nodes[1]
    name = worker.config.node.name
    session = JobId.new()
    replies = api.client.listen(TASK_REPLY.subscription(job=session))
    fn = api._function(collatz)
    arg = TaskArg("msgpack", data=base64.b64encode(encode(27)[1]).decode())
    task = api.signer.sign(Task(session, JobId.new(), 0, "run", fn, [arg]), TASK.name, name)
    api.client.bus.publish(TASK.topic(node=name), TASK.encode(task))
    first = TASK_REPLY.decode(replies.get(timeout=60).payload)
    assert first.ok and first.task == task.task
    api.client.bus.publish(TASK.topic(node=name), TASK.encode(task))  # the same bytes again
    tampered = dataclasses.replace(task, task=JobId.new(), kwargs=[])  # a new id under the old signature
    api.client.bus.publish(TASK.topic(node=name), TASK.encode(tampered))
    assert wait_for(lambda: f"rejected task {tampered.task}" in agent_log(worker.home), 30)
    log = agent_log(worker.home)
    assert f"rejected task {task.task} (run, attempt 0) of API session {session}: replayed" in log
    assert "signature does not match" in log.split(f"rejected task {tampered.task}")[1].splitlines()[0]
    with pytest.raises(queue.Empty):
        replies.get(timeout=2)  # neither was answered
    api.client.unlisten(TASK_REPLY.subscription(job=session))
