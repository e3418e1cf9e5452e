"""The agent's job table, message by message, and every message twice.

QoS 1 delivers at least once, and a submitter sends everything again after its own
reconnect, so each request is sent twice here: the second copy must run nothing
new and answer from what is known, under its own digest.
"""

from __future__ import annotations

from ipdc.agent.jobs import (
    Drop,
    Fetch,
    JobTable,
    Note,
    Prepare,
    Report,
    RunMap,
    RunReduce,
    Unpin,
    key_of,
)
from ipdc.wire.ids import Cid, JobId, NodeName
from ipdc.wire.manifest import JobManifest
from ipdc.wire.unixfs import cid_of

ME = "n-me"
ALICE = "ed25519:alice"
MALLORY = "ed25519:mallory"


def cid(n: int) -> Cid:
    """A distinct, well-formed CID per number (the table only compares them)."""
    return Cid(cid_of(n.to_bytes(4, "big")))


def manifest(submitter: str = ALICE, chunks: int = 2, partitions: int = 2, job: JobId | None = None) -> JobManifest:
    return JobManifest(job_id=job or JobId.new(), owner=NodeName("n-owner"), code={"Map.py": cid(0)},
                       chunks=[cid(10 + i) for i in range(chunks)], partitions=partitions,
                       workers=[NodeName(ME)], submitter=submitter)


def reports(actions: list) -> list:
    return [a.result for a in actions if isinstance(a, Report)]


def held(table: JobTable, m: JobManifest) -> tuple[str, str]:
    key = key_of(m)
    assert table.download(m, "re-dl", 0.0) == [Fetch(key, m)]
    table.fetched(key, "", 0.0)
    return key


def test_download_twice_fetches_once_and_answers_ready_once_fetched() -> None:
    table = JobTable(ME)
    m = manifest()
    key = key_of(m)
    assert table.download(m, "d1", 0.0) == [Fetch(key, m)]
    assert table.download(m, "d2", 1.0) == []  # being fetched: the first copy will answer
    actions = table.fetched(key, "", 2.0)
    (ready,) = reports(actions)
    assert ready.kind == "ready" and ready.re == "d2"  # answers the newest request
    assert Prepare(key) in actions
    (again,) = reports(table.download(m, "d3", 3.0))
    assert again.kind == "ready" and again.re == "d3"


def test_a_failed_fetch_is_reported_and_forgotten() -> None:
    table = JobTable(ME)
    m = manifest()
    key = key_of(m)
    table.download(m, "d1", 0.0)
    (error,) = reports(table.fetched(key, "no such CID", 1.0))
    assert error.kind == "error" and error.phase == "download" and error.re == "d1"
    assert key not in table.jobs


def test_domap_twice_runs_once_and_answers_the_repeat_from_the_result() -> None:
    table = JobTable(ME)
    m = manifest()
    key = held(table, m)
    assert table.domap(key, 1, 0, "m1", 1.0) == [RunMap(key, 1, 0, m.chunks[1], "m1")]
    assert table.domap(key, 1, 0, "m2", 1.0) == []  # running: the first copy will answer
    outputs = [cid(50), cid(51)]
    (done,) = reports(table.task_done(key, "map", 1, 0, outputs, {"map": 0.1}, "m1"))
    assert (done.kind, done.task, done.cids, done.re) == ("map", 1, outputs, "m1")
    (repeat,) = reports(table.domap(key, 1, 0, "m3", 2.0))
    assert repeat.cids == outputs and repeat.re == "m3"
    # a later attempt of the same task is answered from what was computed, not run again
    (moved,) = reports(table.domap(key, 1, 4, "m4", 3.0))
    assert (moved.attempt, moved.cids) == (4, outputs)


def test_a_failed_task_is_answered_again_with_its_error() -> None:
    table = JobTable(ME)
    key = held(table, manifest())
    table.domap(key, 0, 0, "m1", 1.0)
    (err,) = reports(table.task_failed(key, "map", 0, 0, "ValueError: boom\n" + "x" * 100_000, "m1"))
    assert err.kind == "error" and err.phase == "map" and len(err.error) <= 8192 and "cut" in err.error
    (again,) = reports(table.domap(key, 0, 0, "m2", 2.0))
    assert again.error == err.error and again.re == "m2"
    assert isinstance(table.domap(key, 0, 1, "m3", 2.0)[0], RunMap)  # a new attempt may run


def test_buffers_twice_start_one_reduce_when_the_set_is_complete() -> None:
    table = JobTable(ME)
    key = held(table, manifest(chunks=2))
    assert table.buffer(key, 1, 0, cid(60), 0, "b1", 1.0) == []
    assert table.buffer(key, 1, 0, cid(60), 0, "b1", 1.0) == []
    assert table.buffer(key, 1, 1, cid(61), 0, "b2", 1.0) == [RunReduce(key, 1, 0, (cid(60), cid(61)), "b2")]
    assert table.buffer(key, 1, 1, cid(61), 0, "b3", 1.0) == []  # running already
    (done,) = reports(table.task_done(key, "reduce", 1, 0, [cid(70)], {}, "b2"))
    assert (done.kind, done.task, done.attempt) == ("reduce", 1, 0)
    (repeat,) = reports(table.buffer(key, 1, 0, cid(60), 0, "b4", 2.0))
    assert repeat.cids == [cid(70)] and repeat.re == "b4"
    # the next attempt of the partition is a new reduce, with its own set
    assert table.buffer(key, 1, 0, cid(60), 1, "b5", 2.0) == []


def test_jobs_are_keyed_by_submitter_so_another_member_reaches_only_its_own() -> None:
    table = JobTable(ME)
    m = manifest(ALICE)
    held(table, m)
    stranger = (MALLORY, str(m.job_id))  # the same job id, signed by another trusted key
    for actions in (table.domap(stranger, 0, 0, "x", 1.0), table.buffer(stranger, 0, 0, cid(1), 0, "x", 1.0),
                    table.cleanup(stranger), table.renew(stranger, 1.0)):
        (note,) = actions
        assert isinstance(note, Note) and "unknown" in note.text
    assert key_of(m) in table.jobs
    # and it may run a job of its own under that id, beside Alice's
    theirs = manifest(MALLORY, job=m.job_id)
    assert table.download(theirs, "d", 1.0) == [Fetch(key_of(theirs), theirs)]
    assert len(table.jobs) == 2


def test_cleanup_twice_drops_once_and_later_messages_are_ignored() -> None:
    table = JobTable(ME)
    m = manifest()
    key = held(table, m)
    table.domap(key, 0, 0, "m1", 1.0)
    table.task_done(key, "map", 0, 0, [cid(80), cid(81)], {}, "m1")
    (drop,) = table.cleanup(key)
    assert drop == Drop(key, (cid(80), cid(81)), "its submitter cleaned it up")
    (note,) = table.cleanup(key)
    assert isinstance(note, Note) and "finished" in note.text
    note, report = table.download(m, "d", 2.0)
    assert isinstance(note, Note) and isinstance(report, Report)
    assert report.result.kind == "error" and report.result.phase == "download" and report.result.re == "d"
    assert "its submitter cleaned it up" in report.result.error
    assert "finished" in table.domap(key, 1, 0, "m", 2.0)[0].text
    # a task that was still running when the job went: its output is unpinned at once
    assert table.task_done(key, "map", 1, 0, [cid(82)], {}, "m") == [Unpin((cid(82),))]


def test_a_cleanup_for_a_job_never_held_is_refused_and_remembered_nowhere() -> None:
    table = JobTable(ME)
    key = (ALICE, str(JobId.new()))
    (note,) = table.cleanup(key)
    assert isinstance(note, Note) and "unknown" in note.text
    assert key not in table.finished


def test_the_lease_drops_jobs_whose_submitter_went_silent() -> None:
    table = JobTable(ME)
    m = manifest()
    quiet, chatty = held(table, m), held(table, manifest())
    table.renew(chatty, 100.0)
    assert table.expire(50.0, lease=60.0) == []
    (drop,) = table.expire(100.0, lease=60.0)
    assert drop.key == quiet and "job_lease" in drop.why
    # its submitter, back after the lease, asks again: it learns at once why the job is gone
    _, report = table.download(m, "again", 120.0)
    assert isinstance(report, Report) and report.result.kind == "error" and report.result.re == "again"
    assert "it was dropped: its submitter has said nothing for 100 s (agent.job_lease)" in report.result.error
    assert quiet not in table.jobs
    assert quiet not in table.jobs and chatty in table.jobs
    assert table.expire(100.0, lease=60.0) == []  # twice: nothing more


def test_out_of_range_tasks_are_refused() -> None:
    table = JobTable(ME)
    key = held(table, manifest(chunks=2, partitions=2))
    assert isinstance(table.domap(key, 2, 0, "m", 1.0)[0], Note)
    assert isinstance(table.buffer(key, 2, 0, cid(1), 0, "b", 1.0)[0], Note)
    assert isinstance(table.buffer(key, 0, 9, cid(1), 0, "b", 1.0)[0], Note)
