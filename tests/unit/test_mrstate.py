"""The MapReduce controller's state machine, event by event, without a process.

Each test drives :class:`JobState` through one path of the README's "When workers
are lost" section (or of ``--verify``) and checks the exact commands it answers
with. Time is a number the test sets; peers are names.
"""

from __future__ import annotations

import pytest

from ipdc.errors import JobError, TaskFailed, VerificationFailed
from ipdc.submit.mrstate import (
    TRANSITIONS,
    Command,
    Failed,
    FetchPart,
    JobState,
    MapDone,
    PartFetched,
    Ready,
    ReduceDone,
    SendBuffer,
    SendDoMap,
    SendDownload,
    SendRenew,
    Settings,
    TaskState,
    Tick,
)

P = 2  # partitions in most tests


def parts(tag: str, n: int = P) -> tuple[str, ...]:
    """Stand-in partition CIDs of one map output (the machine only compares them)."""
    return tuple(f"{tag}-p{i}" for i in range(n))


class Driver:
    """A job and a clock; every call returns the commands the job answers with."""

    def __init__(self, workers: list[str], chunks: int, slots: int = 1, spares: tuple[str, ...] = (),
                 **settings: object) -> None:
        self.now = 1000.0
        self.settings = Settings(partitions=settings.pop("partitions", P), **settings)  # type: ignore[arg-type]
        self.job = JobState([(w, slots) for w in workers], chunks, self.settings, self.now)
        self.live = set(workers) | set(spares)
        self.spares = spares
        self.connections = 1
        self.connected = True
        self.first = self.job.start()

    def tick(self, dt: float = 0.2) -> list[Command]:
        self.now += dt
        return self.job.handle(Tick(self.now, frozenset(self.live), self.spares, self.connected,
                                    self.connections))

    def ready(self, *peers: str) -> list[Command]:
        out: list[Command] = []
        for peer in peers:
            out += self.job.handle(Ready(peer))
        return out

    def map_done(self, peer: str, task: int, attempt: int, tag: str | None = None) -> list[Command]:
        return self.job.handle(MapDone(peer, task, attempt, parts(tag or f"m{task}", self.settings.partitions)))

    def reduce_done(self, peer: str, partition: int, attempt: int, cid: str | None = None) -> list[Command]:
        return self.job.handle(ReduceDone(peer, partition, attempt, (cid or f"part{partition}",)))

    def lose(self, peer: str) -> list[Command]:
        """The peer vanishes from the live set; ticks until the grace has passed."""
        self.live.discard(peer)
        out = self.tick(0.1)
        out += self.tick(self.settings.will_grace)
        return out


def of(kind: type, commands: list[Command]) -> list:
    return [c for c in commands if isinstance(c, kind)]


def run_all_maps(d: Driver, commands: list[Command]) -> list[Command]:
    """Answer every DoMap (and the ones they lead to) with a result."""
    out: list[Command] = []
    queue = of(SendDoMap, commands)
    while queue:
        c = queue.pop(0)
        got = d.map_done(c.peer, c.task, c.attempt)
        out += got
        queue += of(SendDoMap, got)
    return out


def test_a_job_from_download_to_fetched_parts() -> None:
    d = Driver(["a", "b"], chunks=3)
    assert d.first == [SendDownload("a", ("a", "b")), SendDownload("b", ("a", "b"))]
    out = d.ready("a", "b")
    assert of(SendDoMap, out) == [SendDoMap("a", 0, 0), SendDoMap("b", 1, 0)]
    out = d.map_done("a", 0, 0)
    # the accepted output goes to both reducers, then a's free slot takes the next task
    assert of(SendBuffer, out) == [SendBuffer("a", 0, 0, "m0-p0", 0), SendBuffer("b", 1, 0, "m0-p1", 0)]
    assert of(SendDoMap, out) == [SendDoMap("a", 2, 0)]
    d.map_done("b", 1, 0)
    out = d.map_done("a", 2, 0)
    assert {t.state for t in d.job.reduces} == {TaskState.RUNNING}
    assert of(SendDoMap, out) == []
    assert of(FetchPart, d.reduce_done("a", 0, 0)) == [FetchPart(0, "part0", "a")]
    assert of(FetchPart, d.reduce_done("b", 1, 0)) == [FetchPart(1, "part1", "b")]
    assert not d.job.done
    d.job.handle(PartFetched(0))
    d.job.handle(PartFetched(1))
    assert d.job.done
    assert [e["event"] for e in d.job.maps[0].story] == ["running", "reported", "done"]


def test_every_report_twice_changes_nothing() -> None:
    d = Driver(["a", "b"], chunks=2)
    first = d.ready("a", "b")
    assert d.ready("a", "b") == []
    for c in of(SendDoMap, first):
        once = d.map_done(c.peer, c.task, c.attempt)
        assert d.map_done(c.peer, c.task, c.attempt) == []
        assert of(SendBuffer, once)
    assert of(FetchPart, d.reduce_done("a", 0, 0))
    assert d.reduce_done("a", 0, 0) == []
    d.job.handle(PartFetched(0))
    d.job.handle(PartFetched(0))
    assert d.job.reduces[0].state is TaskState.FETCHED


def test_a_result_from_a_superseded_attempt_or_a_stranger_is_ignored() -> None:
    d = Driver(["a", "b"], chunks=1)
    d.ready("a", "b")
    assert d.map_done("a", 0, 7) == []          # no such attempt
    assert d.map_done("b", 0, 0) == []          # attempt 0 runs on a, not b
    assert d.job.handle(MapDone("x", 0, 0, parts("m0"))) == []  # not a worker
    assert d.job.maps[0].state is TaskState.RUNNING


def test_a_worker_lost_mid_map_is_replaced_and_its_task_reserved_for_the_replacement() -> None:
    d = Driver(["a", "b"], chunks=2, spares=("a", "b", "c"))
    d.ready("a", "b")  # a runs task 0, b runs task 1
    out = d.lose("a")
    assert of(SendDownload, out) == [SendDownload("c", ("b", "c"))]
    assert d.job.lost.keys() == {"a"}
    assert d.job.maps[0].reserved_for == "c" and d.job.maps[0].state is TaskState.PENDING
    # b finishes task 1 but may not take task 0: it waits for c
    assert of(SendDoMap, d.map_done("b", 1, 0)) == []
    assert of(SendDoMap, d.ready("c")) == [SendDoMap("c", 0, 1)]
    # the reducer of partition 0 (planned on a) moved to c, and is fed what is accepted
    reduce0 = d.job.reduces[0]
    assert [a.peer for a in reduce0.running()] == ["c"]
    assert d.job.reassigned[0] == {"kind": "map", "task": 0, "from": "a", "to": "c", "attempt": 0}
    assert d.job.maps[0].failures == 1


def test_a_finished_mappers_output_is_computed_again_and_its_reducers_start_over() -> None:
    d = Driver(["a", "b"], chunks=2, spares=("a", "b", "c"))
    d.ready("a", "b")
    d.map_done("a", 0, 0)
    d.map_done("b", 1, 0)  # every map done; b's reducer holds a's output
    b_attempt = d.job.reduces[1].running()[0]
    assert b_attempt.fed == {0: "a", 1: "b"}
    out = d.lose("a")
    # its output lived in a's kubo: it runs again, on b, which is free (only running tasks
    # wait for the replacement)
    assert SendDoMap("b", 0, 1) in out
    assert d.job.maps[1].state is TaskState.DONE
    # b's reducer starts a new attempt, fed only what is still accepted
    new = d.job.reduces[1].running()
    assert [(x.peer, x.number) for x in new] == [("b", 1)]
    assert SendBuffer("b", 1, 1, "m1-p1", 1) in out
    assert d.job.maps[0].failures == 0  # a finished map output lost is not the task's failure
    assert of(SendBuffer, d.map_done("b", 0, 1)) == [SendBuffer("b", 1, 0, "m0-p1", 1)]


def test_a_worker_lost_mid_reduce_counts_against_the_partition() -> None:
    d = Driver(["a", "b"], chunks=1, spares=("a", "b", "c"))
    d.ready("a", "b")
    d.map_done("a", 0, 0)
    assert d.job.reduces[1].state is TaskState.RUNNING
    out = d.lose("b")
    assert d.job.reduces[1].failures == 1
    assert of(SendDownload, out) == [SendDownload("c", ("a", "c"))]
    out = d.ready("c")
    assert SendBuffer("c", 1, 0, "m0-p1", 1) in out
    assert of(FetchPart, d.reduce_done("c", 1, 1)) == [FetchPart(1, "part1", "c")]
    assert d.reduce_done("b", 1, 0) == []  # the lost worker's answer comes too late


def test_without_a_spare_the_remaining_workers_take_over() -> None:
    d = Driver(["a", "b"], chunks=2)
    d.ready("a", "b")
    out = d.lose("a")
    assert of(SendDownload, out) == []
    assert d.job.maps[0].reserved_for == ""
    out = d.map_done("b", 1, 0)
    assert of(SendDoMap, out) == [SendDoMap("b", 0, 1)]
    assert [a.peer for a in d.job.reduces[0].running()] == ["b"]


def test_every_worker_lost_fails_the_job() -> None:
    d = Driver(["a"], chunks=1, partitions=1)
    d.ready("a")
    with pytest.raises(JobError, match="every worker was lost"):
        d.lose("a")


def test_a_failed_map_is_retried_on_another_peer_then_fails_the_job() -> None:
    d = Driver(["a", "b", "c"], chunks=1, max_attempts=3, partitions=3)
    d.ready("a", "b", "c")
    out = d.job.handle(Failed("a", "map", 0, 0, "ValueError: boom"))
    assert of(SendDoMap, out) == [SendDoMap("b", 0, 1)]
    out = d.job.handle(Failed("b", "map", 0, 1, "ValueError: boom"))
    assert of(SendDoMap, out) == [SendDoMap("c", 0, 2)]
    with pytest.raises(TaskFailed, match=r"map task 0 failed 3 time.*a, b, c") as caught:
        d.job.handle(Failed("c", "map", 0, 2, "ValueError: boom"))
    assert caught.value.peer == "c"


def test_a_failed_reduce_moves_to_a_peer_that_has_not_failed_it() -> None:
    d = Driver(["a", "b"], chunks=1)
    d.ready("a", "b")
    d.map_done("a", 0, 0)
    out = d.job.handle(Failed("a", "reduce", 0, 0, "boom"))
    assert SendBuffer("b", 0, 0, "m0-p0", 1) in out
    assert [(x.peer, x.number) for x in d.job.reduces[0].running()] == [("b", 1)]


def test_peers_are_not_dropped_during_our_own_outage_and_requests_are_sent_again() -> None:
    d = Driver(["a", "b"], chunks=2, peer_timeout=10.0)
    d.ready("a")  # b has not answered its Download yet
    d.connected = False
    d.live = set()
    assert not d.job.lost and d.tick(5.0) == []  # cut off ourselves: nobody is dropped
    d.connected, d.connections = True, 2
    out = d.tick()
    assert SendDownload("b", ("a", "b")) in out  # not ready: asked again
    assert SendDoMap("a", 0, 0) in out           # still running: asked again
    d.tick(5.0)
    assert not d.job.lost  # within peer_timeout of our reconnect
    d.live = {"b"}
    d.tick(6.0)
    assert d.job.lost.keys() == {"a"}


def test_a_last_will_within_the_grace_does_not_drop_a_worker() -> None:
    d = Driver(["a", "b"], chunks=1, will_grace=0.5)
    d.ready("a", "b")
    d.live.discard("a")
    d.tick(0.3)
    d.live.add("a")  # a broker restart: the will, then the presence again
    d.tick(0.3)
    d.tick(1.0)
    assert not d.job.lost


def test_a_worker_that_never_accepts_the_job_is_replaced() -> None:
    d = Driver(["a", "b"], chunks=1, ready_timeout=30.0, spares=("a", "b", "c"))
    d.ready("a")
    d.tick(29.0)
    assert not d.job.lost
    out = d.tick(2.0)
    assert "trust" in d.job.lost["b"]
    assert of(SendDownload, out) == [SendDownload("c", ("a", "c"))]


def test_a_download_error_drops_the_worker() -> None:
    d = Driver(["a", "b"], chunks=1, spares=("a", "b", "c"))
    d.tick()
    out = d.job.handle(Failed("b", "download", 0, 0, "could not fetch Map.py"))
    assert d.job.lost == {"b": "could not fetch Map.py"}
    assert of(SendDownload, out) == [SendDownload("c", ("a", "c"))]


def test_a_part_that_cannot_be_fetched_is_reduced_again() -> None:
    d = Driver(["a", "b"], chunks=1)
    d.ready("a", "b")
    d.map_done("a", 0, 0)
    d.reduce_done("a", 0, 0)
    out = d.job.handle(PartFetched(0, "no data for 30 s"))
    assert d.job.reduces[0].state is TaskState.RUNNING
    assert SendBuffer("b", 0, 0, "m0-p0", 1) in out


def test_renewals_keep_the_workers_lease() -> None:
    d = Driver(["a", "b"], chunks=1, renew_every=10.0)
    assert of(SendRenew, d.tick(5.0)) == []
    assert of(SendRenew, d.tick(5.0)) == [SendRenew("a"), SendRenew("b")]
    assert of(SendRenew, d.tick(1.0)) == []


def test_verify_two_accepts_only_agreeing_replicas() -> None:
    d = Driver(["a", "b", "c"], chunks=1, verify=2, partitions=3)
    out = d.ready("a", "b", "c")
    assert of(SendDoMap, out) == [SendDoMap("a", 0, 0), SendDoMap("b", 0, 1)]
    assert of(SendBuffer, d.map_done("a", 0, 0)) == []  # one vote is not enough
    out = d.map_done("b", 0, 1)
    assert d.job.maps[0].state is TaskState.DONE and d.job.maps[0].by == ("a", "b")
    # each partition has two reduce replicas, on distinct peers
    assert {(b.peer, b.partition) for b in of(SendBuffer, out)} == {
        ("a", 0), ("b", 0), ("b", 1), ("c", 1), ("c", 2), ("a", 2)}
    assert of(FetchPart, d.reduce_done("a", 0, 0)) == []
    assert of(FetchPart, d.reduce_done("b", 0, 1)) == [FetchPart(0, "part0", "a")]


def test_verify_two_names_the_peers_that_disagree() -> None:
    d = Driver(["a", "b", "c"], chunks=1, verify=2, partitions=3)
    d.ready("a", "b", "c")
    d.map_done("a", 0, 0)
    with pytest.raises(VerificationFailed) as caught:
        d.map_done("b", 0, 1, tag="tampered")
    assert caught.value.reports == {"a": list(parts("m0", 3)), "b": list(parts("tampered", 3))}
    assert "tampered-p0" in str(caught.value) and "b:" in str(caught.value)


def test_verify_majority_outvotes_one_liar() -> None:
    d = Driver(["a", "b", "c"], chunks=1, verify=3, majority=True, partitions=3)
    d.ready("a", "b", "c")
    d.map_done("a", 0, 0)
    d.map_done("b", 0, 1, tag="tampered")
    d.map_done("c", 0, 2)
    assert d.job.maps[0].output == parts("m0", 3) and d.job.maps[0].by == ("a", "c")


def test_verify_needs_enough_workers() -> None:
    with pytest.raises(JobError, match="--verify 3 needs at least 3 workers"):
        Driver(["a", "b"], chunks=1, verify=3)


def test_transitions_are_checked() -> None:
    d = Driver(["a"], chunks=1, partitions=1)
    task = d.job.maps[0]
    assert TaskState.FETCHED not in TRANSITIONS[task.state]
    with pytest.raises(AssertionError, match="not a transition"):
        d.job._move(task, TaskState.FETCHED, "test")


def test_the_whole_job_survives_losing_every_original_worker_one_by_one() -> None:
    """A long path: each original worker is lost in turn while spares stand in."""
    d = Driver(["a", "b"], chunks=4, spares=("a", "b", "c", "d"))
    out = d.ready("a", "b")
    out += run_all_maps(d, out)
    out += d.lose("a")
    out += d.ready("c")
    out += run_all_maps(d, out)
    out += d.lose("b")
    out += d.ready("d")
    out += run_all_maps(d, out)
    for task in d.job.reduces:
        for a in task.running():
            assert len(a.fed) == 4
            d.reduce_done(a.peer, task.index, a.number)
    for p in range(P):
        d.job.handle(PartFetched(p))
    assert d.job.done
    assert set(d.job.workers) == {"c", "d"}
