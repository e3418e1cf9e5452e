"""The job history (SQLite): versioned migrations, and what the service writes and the CLI reads."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ipdc.control import history as history_module
from ipdc.control.history import MIGRATIONS, History, migrate
from ipdc.errors import HistoryError


def version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def task(kind: str, index: int, state: str, attempts: list[tuple[int, str, str]]) -> dict[str, object]:
    done = state == "done"
    return {"kind": kind, "index": index, "state": state, "output": [f"cid-{kind}{index}"] if done else [],
            "by": ["a"] if done else [], "failures": 0, "tried": [], "story": [{"t": 0.0, "event": state}],
            "attempts": [{"number": n, "peer": p, "state": s, "started": 0.5 * n, "ended": 0.5 * n + 0.2,
                          "error": "boom" if s == "failed" else ""} for n, p, s in attempts]}


def test_a_new_history_has_the_newest_schema_and_is_private(tmp_path: Path) -> None:
    History(tmp_path / "ipdc.db").close()
    assert version(tmp_path / "ipdc.db") == len(MIGRATIONS)
    assert (tmp_path / "ipdc.db").stat().st_mode & 0o777 == 0o600


def test_a_history_made_before_the_node_makes_its_home_private(tmp_path: Path) -> None:
    """``ipdc jobs`` on a machine with no node made ``~/.ipdc`` with the umask's 0755."""
    History(tmp_path / "home" / "ipdc.db").close()
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700


def test_an_old_history_is_migrated_step_by_step_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "ipdc.db"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, path, target=1) == 1
    db.execute("INSERT INTO jobs (id, kind, submitter, node, state, submitted_at) "
               "VALUES ('ab', 'mapreduce', 'k', 'n', 'succeeded', 1.0)")
    db.close()
    history = History(path)
    assert version(path) == len(MIGRATIONS)
    (job,) = history.jobs()
    assert job["id"] == "ab" and job["lost"] == {} and job["reassigned"] == []
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'jobs_by_state'").fetchone()


def test_a_failed_migration_leaves_the_previous_version(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ipdc.db"
    History(path).close()

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("disk on fire")

    monkeypatch.setattr(history_module, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(HistoryError, match="disk on fire"):
        History(path)
    assert version(path) == len(MIGRATIONS)
    with sqlite3.connect(path) as db:
        assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone()


def test_a_history_from_a_newer_ipdc_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ipdc.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(HistoryError, match="newer than this IPDC"):
        History(path)


def test_jobs_tasks_and_attempts_round_trip(tmp_path: Path) -> None:
    history = History(tmp_path / "ipdc.db")
    history.add("aa11", "mapreduce", "ed25519:key", "n-1", {"k": 2}, "/out/aa11", submitted_at=10.0)
    history.add("bb22", "mapreduce", "ed25519:key", "n-1", {"k": 3}, "/out/bb22", submitted_at=20.0)
    history.update("aa11", state="running", started_at=11.0, progress={"map": [1, 2]},
                   workers=[["a", 1], ["b", 1]], lost={"c": "gone"})
    tasks = [task("map", 0, "done", [(0, "c", "lost"), (1, "a", "done")]),
             task("map", 1, "running", [(0, "b", "running")]),
             task("reduce", 0, "pending", [(0, "a", "failed"), (1, "b", "running")])]
    history.save_tasks("aa11", tasks)
    history.save_tasks("aa11", tasks)  # written again as the job goes on: replaced, never doubled
    job = history.job("aa11")
    assert job is not None
    assert (job["state"], job["progress"], job["workers"], job["lost"]) == \
        ("running", {"map": [1, 2]}, [["a", 1], ["b", 1]], {"c": "gone"})
    assert job["tasks"]["map"] == tasks[:2] and job["tasks"]["reduce"] == tasks[2:]
    assert [j["id"] for j in history.jobs()] == ["bb22", "aa11"]
    assert [j["id"] for j in history.jobs(states=["running"])] == ["aa11"]
    assert history.jobs(limit=1)[0]["id"] == "bb22"
    assert history.job("cc33") is None


def test_updates_are_checked(tmp_path: Path) -> None:
    history = History(tmp_path / "ipdc.db")
    history.add("aa11", "mapreduce", "k", "n", {}, "/o")
    with pytest.raises(HistoryError, match="unknown job state"):
        history.update("aa11", state="exploded")
    with pytest.raises(HistoryError, match="unknown job field"):
        history.update("aa11", colour="red")


def test_a_job_id_prefix_names_one_job(tmp_path: Path) -> None:
    history = History(tmp_path / "ipdc.db")
    history.add("ab12", "mapreduce", "k", "n", {}, "/o")
    history.add("ab34", "mapreduce", "k", "n", {}, "/o")
    assert history.resolve("ab1") == "ab12"
    with pytest.raises(HistoryError, match="more than one job"):
        history.resolve("ab")
    with pytest.raises(HistoryError, match="no job ff"):
        history.resolve("ff")
    with pytest.raises(HistoryError, match="not a job id"):
        history.resolve("ab%")
