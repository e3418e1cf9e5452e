"""A controller that stopped (a kill -9) and starts again: its JobState is rebuilt from what
it recorded (``task_record``, as the job history keeps it), and only the rest is done."""

from __future__ import annotations

from ipdc.submit.mapreduce import task_of, task_record
from ipdc.submit.mrstate import (
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
    TaskState,
)
from tests.unit.test_mrstate import Driver, of, parts


def resumed(d: Driver, elapsed: float = 5.0) -> tuple[JobState, list[object]]:
    """A fresh JobState rebuilt from ``d``'s tasks as recorded, the way the service does it."""
    records = [task_record(t) for t in (*d.job.maps, *d.job.reduces)]
    maps = [task_of(r) for r in records if r["kind"] == "map"]
    reduces = [task_of(r) for r in records if r["kind"] == "reduce"]
    job = JobState(list(d.job.workers.items()), len(maps), d.settings, d.now + 100)
    first = job.restore(maps, reduces, dict(d.job.lost), list(d.job.reassigned), elapsed)
    return job, [*job.start(), *first]


def test_a_rebuilt_job_dispatches_only_the_maps_not_accepted() -> None:
    d = Driver(["a", "b"], chunks=4)
    sent = of(SendDoMap, d.ready("a", "b"))
    assert sent == [SendDoMap("a", 0, 0), SendDoMap("b", 1, 0)]
    d.map_done("a", 0, 0)  # task 0 accepted; a then took task 2, which was running at the kill
    job, first = resumed(d)
    assert of(SendDownload, first) == [SendDownload("a", ("a", "b")), SendDownload("b", ("a", "b"))]
    assert [t.state for t in job.maps] == [TaskState.DONE] + [TaskState.PENDING] * 3
    out = job.handle(Ready("a")) + job.handle(Ready("b"))
    domaps = of(SendDoMap, out)
    assert 0 not in {c.task for c in domaps}, "an accepted map task was sent again"
    # the interrupted attempts are superseded, and the new ones take the next numbers
    assert {(c.task, c.attempt) for c in domaps} == {(1, 1), (2, 1)}
    assert [a.state for a in job.maps[1].attempts] == ["superseded", "running"]
    # the accepted output goes to the reducers again, under their new attempts
    assert SendBuffer("a", 0, 0, "m0-p0", 1) in of(SendBuffer, out)
    assert SendBuffer("b", 1, 0, "m0-p1", 1) in of(SendBuffer, out)


def test_a_rebuilt_job_runs_to_the_end_and_keeps_the_accepted_outputs() -> None:
    d = Driver(["a", "b"], chunks=2)
    d.ready("a", "b")
    d.map_done("a", 0, 0)
    d.map_done("b", 1, 0)
    # reduce 0 is accepted, and not yet fetched, when the controller stops
    assert of(FetchPart, d.reduce_done("a", 0, 0)) == [FetchPart(0, "part0", "a")]
    job, first = resumed(d, elapsed=7.5)
    assert job.elapsed == 7.5  # times go on from the job's start, not from the restart
    assert of(FetchPart, first) == [FetchPart(0, "part0", "a")]  # fetched again by CID, not recomputed
    out = job.handle(Ready("a")) + job.handle(Ready("b"))
    assert of(SendDoMap, out) == []
    assert {(c.peer, c.partition, c.attempt) for c in of(SendBuffer, out)} == {("b", 1, 1)}
    assert of(FetchPart, job.handle(ReduceDone("b", 1, 1, ("part1",)))) == [FetchPart(1, "part1", "b")]
    job.handle(PartFetched(0))
    job.handle(PartFetched(1))
    assert job.done
    assert [m.output for m in job.maps] == [parts("m0"), parts("m1")]
    assert [e["event"] for e in job.maps[0].story][-1] == "resumed"


def test_a_report_for_an_attempt_of_the_old_controller_is_ignored() -> None:
    d = Driver(["a", "b"], chunks=2)
    d.ready("a", "b")
    job, _ = resumed(d)
    job.handle(Ready("a"))
    job.handle(Ready("b"))
    assert job.handle(MapDone("a", 0, 0, parts("m0"))) == []  # attempt 0 died with the old controller
    assert job.maps[0].state is TaskState.RUNNING
    assert of(SendBuffer, job.handle(MapDone("a", 0, 1, parts("m0"))))


def test_failures_before_the_restart_still_count() -> None:
    d = Driver(["a", "b"], chunks=1, max_attempts=2)
    d.ready("a", "b")
    d.job.handle(Failed("a", "map", 0, 0, "boom"))
    job, _ = resumed(d)
    assert job.maps[0].failures == 1 and job.maps[0].tried == ["a"]
    out = job.handle(Ready("a")) + job.handle(Ready("b"))
    assert [c.peer for c in of(SendDoMap, out)] == ["b"]  # not back to the peer that failed it
