"""User mistakes on the command line fail with one line saying what to do, before anything
starts.

``ipdc mr`` with no node running starts a temporary cluster; a mistake the user can fix
at once must fail before it, as it does on a running node, with one line and no traceback.
``--k -1`` once reached the cluster and ended in a ValueError traceback; a missing input,
``--k 0`` and ``--chunks 0`` were found only after four kubo nodes had started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ipdc.cli import _interrupted, _print_result, main
from ipdc.errors import JobCancelled
from ipdc.jobs import shipped


def ipdc(home: Path, *args: str) -> Result:
    return CliRunner(env={"IPDC_HOME": str(home)}).invoke(main, list(args))


def ipdc_mr(home: Path, *args: str) -> Result:
    return ipdc(home, "mr", *args)


@pytest.mark.parametrize(("args", "message"), [
    (["--k", "-1"], "--k must be at least 1, not -1"),
    (["--k", "0"], "--k must be at least 1, not 0"),
    (["--chunks", "0"], "--chunks must be 1 to 65536"),
    (["--chunks", "1000000000"], "--chunks must be 1 to 65536"),
])
def test_a_bad_number_fails_before_a_temporary_cluster_starts(tmp_path: Path, args: list[str],
                                                               message: str) -> None:
    done = ipdc_mr(tmp_path / "home", *args, str(shipped("mapreduce", "input.txt")))
    assert done.exit_code == 1, done.stderr
    assert done.exception is None or isinstance(done.exception, SystemExit)  # not a traceback
    assert message in done.stderr
    assert "temporary" not in done.stderr


def test_a_missing_input_fails_before_a_temporary_cluster_starts(tmp_path: Path) -> None:
    done = ipdc_mr(tmp_path / "home", "--k", "2", str(tmp_path / "nothing.txt"))
    assert done.exit_code == 1, done.stderr
    assert f"input {tmp_path / 'nothing.txt'} does not exist" in done.stderr
    assert "temporary" not in done.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("prefix", ["3f2a", "zzzz"])
def test_job_get_of_an_id_prefix_no_job_here_has_says_to_give_the_whole_id(tmp_path: Path, prefix: str) -> None:
    """It used to go to the service, which said only ``not a job id: '3f2a'``."""
    done = ipdc(tmp_path / "home", "job", "get", prefix)
    assert done.exit_code == 1, done.stderr
    assert "`ipdc jobs --all`" in done.stderr
    assert "a job of another node is named by its whole id (32 hex digits)" in done.stderr


def test_a_cached_result_says_why_it_has_no_workers(capsys: pytest.CaptureFixture[str]) -> None:
    """A cache hit printed an empty ``workers:`` line."""
    _print_result({"job_id": "b" * 32, "timings": {"total": 0.01}, "cached": True, "cached_from": "a" * 32,
                   "output": "/o", "result_cid": "bafy", "workers": []}, as_json=False)
    assert "workers: none (the result was cached)" in capsys.readouterr().out


def test_an_output_that_is_a_file_is_refused_by_name(tmp_path: Path) -> None:
    """``-o FILE`` ended in a NotADirectoryError traceback."""
    (tmp_path / "afile").write_text("")
    done = ipdc_mr(tmp_path / "home", "--k", "1", str(shipped("mapreduce", "input.txt")), "-o", str(tmp_path / "afile"))
    assert done.exit_code == 1, done.stderr
    assert f"output {tmp_path / 'afile'} is a file" in done.stderr


def test_node_init_refuses_negative_slots_before_it_makes_the_node(tmp_path: Path) -> None:
    """``--slots -1`` made a node whose ipdc.conf every later command refused (node.slots)."""
    done = ipdc(tmp_path / "home", "node", "init", "--slots", "-1")
    assert done.exit_code == 2
    assert "--slots" in done.stderr
    assert not (tmp_path / "home").exists()


class _CancelInterrupted:
    """A controller service client whose cancel is interrupted by a second Ctrl-C."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, object]]] = []

    def call(self, op: str, **args: object) -> dict[str, object]:
        self.calls.append((op, args))
        raise KeyboardInterrupt


def test_a_second_ctrl_c_while_cancelling_says_the_cancel_goes_on() -> None:
    """It printed click's bare "Aborted!", and the user could not tell whether the job ran on."""
    client = _CancelInterrupted()
    with pytest.raises(JobCancelled, match="the controller service goes on cancelling job j1") as raised:
        _interrupted(client, "j1")  # type: ignore[arg-type]
    assert client.calls == [("cancel", {"job_id": "j1"})]
    assert "ipdc job status j1" in str(raised.value)


def test_submitting_from_the_cli_loads_no_http_client() -> None:
    """``ipdc mr`` parses its INPUT with ipdc.submit.inputs and talks to the controller service
    over a Unix socket: importing kubo's HTTP client (httpx, ~60 ms) only for a type hint was a
    third of the command's start."""
    probe = ("import sys, ipdc.cli, ipdc.jobs, ipdc.submit.inputs, ipdc.ctlsock; "
             "assert 'httpx' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ipdc'))")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
