"""Hadoop Streaming without a swarm: the line splitting and grouping of the runner's side,
the stages as the manifest carries them, and the checks of a job's code on the submitter
(Python files by their syntax tree, commands by shlex)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from ipdc.errors import JobError, MessageError
from ipdc.runner.streaming import map_command, records, reduce_command, take_sorted_lines
from ipdc.submit.jobfiles import check_python, plan_code
from ipdc.wire.partition import KeyGroups, read_groups, stable_partition
from ipdc.wire.stages import PYTHON_JOB, CommandStage, PythonStage, Stages, stages_of

# -- records and sorted lines ----------------------------------------------------------------


def test_records_split_at_the_first_tab_and_keep_the_rest() -> None:
    out = list(records([b"a\t1\nb\tx\ty\nno tab\n\t\nlast\tline"]))
    assert out == [("a", "1"), ("b", "x\ty"), ("no tab", ""), ("", ""), ("last", "line")]


def test_records_do_not_depend_on_where_the_blocks_are_cut() -> None:
    data = "ключ\tзначение\n日本\t語\r\nw\xe9\t1\n".encode() + b"bad\xff\xfe\tv\x80\n"
    whole = list(records([data]))
    for size in (1, 2, 3, 5, 7):
        assert list(records(data[i:i + size] for i in range(0, len(data), size))) == whole
    assert whole[1] == ("日本", "語\r")  # only \n ends a line
    key, value = whole[3]
    assert key.encode("utf-8", "surrogateescape") == b"bad\xff\xfe"
    assert value.encode("utf-8", "surrogateescape") == b"v\x80"


def test_sorted_lines_sort_keys_by_their_bytes_and_keep_each_keys_lines_together() -> None:
    groups = KeyGroups()
    raw = [b"b", b"\xff", b"a", "é".encode(), b"B", "\U0001f680".encode(), b"a\x80"]
    pairs = [(k.decode("utf-8", "surrogateescape"), str(i)) for i, k in enumerate(raw)]
    groups.add_pairs([*pairs, ("b", "again")])
    lines = b"".join(take_sorted_lines(groups)).split(b"\n")[:-1]
    assert not groups.by_key  # taken: the values are not held twice
    keys = [line.partition(b"\t")[0] for line in lines]
    assert keys == sorted(keys)  # bytewise: \xff last, above the 4-byte UTF-8 of the rocket
    assert keys[-1] == b"\xff"
    assert lines[keys.index(b"b"):keys.index(b"b") + 2] == [b"b\t0", b"b\tagain"]


def test_sorted_lines_write_keys_and_values_of_a_python_mapper_as_json() -> None:
    groups = KeyGroups()
    groups.add_pairs([(("t", 1), {"n": 2}), (3, None)])
    assert b"".join(take_sorted_lines(groups)) == b'3\tnull\n["t", 1]\t{"n": 2}\n'


# -- running programs (outside a sandbox here; tests/integration/test_streaming.py runs them in one)

CAP = 1 << 20


def test_a_mapper_gets_the_raw_bytes_and_its_lines_are_partitioned_as_python_keys() -> None:
    data = b"b a\nc\xff a\n"
    mapper = CommandStage(("awk", '{for (i = 1; i <= NF; i++) print $i "\t1"}'), shipped=False)
    documents = map_command(mapper, None, data, 3, CAP)
    found: dict[bytes, list[str]] = {}
    for p, document in enumerate(documents):
        columns = read_groups(document)
        for key, entry in zip(columns.keys, columns.values, strict=True):
            assert stable_partition(key, 3) == p
            found[key.encode("utf-8", "surrogateescape")] = entry if isinstance(entry, list) else [entry]
    assert found == {b"a": ["1", "1"], b"b": ["1"], b"c\xff": ["1"]}


def test_a_mapper_and_combiner_get_the_input_file_as_hadoop_streaming_names_it() -> None:
    mapper = CommandStage(("awk", '{print ENVIRON["mapreduce_map_input_file"] "\t" ENVIRON["map_input_file"]}'),
                          shipped=False)
    combiner = CommandStage(("awk", '{print $0 "|" ENVIRON["mapreduce_map_input_file"]}'), shipped=False)
    documents = map_command(mapper, combiner, b"x\n", 1, CAP, path="docs/a b.txt")
    columns = read_groups(documents[0])
    assert (columns.keys, columns.values) == (["docs/a b.txt"], ["docs/a b.txt|docs/a b.txt"])


def test_a_reducer_reads_sorted_lines_and_its_output_is_the_part() -> None:
    mapper = CommandStage(("awk", '{print $1 "\t" $2}'), shipped=False)
    documents = map_command(mapper, None, b"z 1\na 2\nz 3\nm\n", 2, CAP)
    reducer = CommandStage(("cat",), shipped=False)
    lines = b"".join(reduce_command(reducer, documents, CAP)).split(b"\n")
    assert lines[:2] == [b"a\t2", b"m\t"]  # a line without a TAB: a key with an empty value
    assert sorted(lines[2:4]) == [b"z\t1", b"z\t3"]  # one key's values in no set order
    assert lines[4:] == [b""]


def test_a_combiner_gets_the_map_tasks_sorted_output() -> None:
    mapper = CommandStage(("awk", '{for (i = 1; i <= NF; i++) print $i "\t1"}'), shipped=False)
    combiner = CommandStage(("awk", "-F", "\\t", '{print $1 "\t" NR}'), shipped=False)  # NR: the line's place
    documents = map_command(mapper, combiner, b"c b a\nb\n", 1, CAP)
    columns = read_groups(documents[0])
    assert dict(zip(columns.keys, columns.values, strict=True)) == {"a": ["1"], "b": ["2", "3"], "c": ["4"]}


def test_a_failing_program_is_a_task_error_with_the_end_of_its_stderr() -> None:
    failing = CommandStage(("awk", 'BEGIN { for (i = 0; i < 5000; i++) print "noise " i > "/dev/stderr"; '
                                   'print "the real reason" > "/dev/stderr"; exit 3 }'), shipped=False)
    with pytest.raises(JobError, match="exited with status 3") as raised:
        map_command(failing, None, b"x\n", 1, CAP)
    message = str(raised.value)
    assert message.endswith("the real reason") and "noise 4999" in message
    assert len(message) < 2400  # only the end of 60 kB of stderr


def test_a_program_killed_by_a_limits_signal_names_the_limit() -> None:
    suicide = CommandStage(("python3", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGXCPU)"),
                           shipped=False)
    with pytest.raises(JobError, match=r"was killed by SIGXCPU \(the CPU-time limit, sandbox.cpu_seconds\) "
                                       r"\(it wrote nothing on stderr\)"):
        map_command(suicide, None, b"x\n", 1, CAP)


@pytest.mark.timeout(60)
def test_what_a_program_leaves_running_is_ended_with_it() -> None:
    """A background process would hold the program's stdout open: the task would wait for it
    (here 10 minutes) instead of ending with its program."""
    marker = "601.25"
    leaves = CommandStage(("sh", "-c", f"sleep {marker} & echo 'a\tb'"), shipped=False)
    documents = map_command(leaves, None, b"x\n", 1, CAP)
    assert read_groups(documents[0]).keys == ["a"]
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]


@pytest.mark.timeout(60)
def test_a_leftover_in_a_session_of_its_own_cannot_hold_the_task(tmp_path: Path) -> None:
    """Attack: a mapper starts a daemon with ``setsid`` (out of the process group that is
    killed with it) holding its stdout and stderr, and exits. The task ends with its
    program, with its program's output only (not the daemon's later lines), instead of
    waiting for the daemon (here 10 minutes)."""
    pid_file = tmp_path / "daemon.pid"
    daemon = f"echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; exec sleep 601.75"
    mapper = CommandStage(("sh", "-c", f"setsid sh -c '{daemon}' & while [ ! -s {pid_file} ]; do :; done; "
                                       "echo 'a\tb'; echo oops >&2"), shipped=False)
    try:
        documents = map_command(mapper, None, b"x\n", 1, CAP)
        assert read_groups(documents[0]).keys == ["a"]
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_a_program_that_is_not_there_is_named_with_what_to_do() -> None:
    with pytest.raises(JobError, match=r"mapper program 'no-such-mapper' was not found .*--file no-such-mapper"):
        map_command(CommandStage(("no-such-mapper",), shipped=False), None, b"x\n", 1, CAP)


def test_output_past_the_cap_fails_the_task() -> None:
    flood = CommandStage(("awk", 'BEGIN { for (i = 0; i < 100000; i++) print "0123456789abcdef\t1" }'),
                         shipped=False)
    with pytest.raises(JobError, match=r"wrote more than 1 MB \(sandbox.file_mb\)"):
        map_command(flood, None, b"", 1, CAP)


# -- stages in the manifest -----------------------------------------------------------------


def test_stages_round_trip_through_the_manifests_params() -> None:
    stages = Stages(CommandStage(("./m", "-x"), shipped=True), PythonStage("Reduce.py"),
                    CommandStage(("sort",), shipped=False))
    assert stages_of(stages.to_params(), {"m", "Reduce.py"}) == stages
    assert stages_of(None, set()) == PYTHON_JOB


@pytest.mark.parametrize("params", [
    {"map": {"kind": "python", "file": "Map.py"}},  # no reduce
    {"map": {"kind": "shell", "argv": ["x"]}, "reduce": {"kind": "python", "file": "Reduce.py"}},
    {"map": {"kind": "command", "argv": [], "shipped": False}, "reduce": {"kind": "python", "file": "Reduce.py"}},
    {"map": {"kind": "command", "argv": ["./evil"], "shipped": True},  # not a file of the job
     "reduce": {"kind": "python", "file": "Reduce.py"}},
    {"map": {"kind": "python", "file": "Map.py"}, "reduce": {"kind": "python", "file": "Reduce.py"},
     "combine": {"kind": "command", "argv": ["sort"], "shipped": False}},  # a command combiner after Python
    {"map": {"kind": "command", "argv": ["a\0b"], "shipped": False}, "reduce": {"kind": "python", "file": "Reduce.py"}},
])
def test_malformed_stages_are_refused(params: dict[str, object]) -> None:
    with pytest.raises(MessageError):
        stages_of(params, {"Map.py", "Reduce.py"})


# -- the submitter's checks -----------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_commands_are_split_with_shlex_and_shipped_programs_found_by_name(tmp_path: Path) -> None:
    mapper = write(tmp_path, "mapper", "#!/bin/sh\n")
    data = write(tmp_path, "stop words.txt", "")
    with pytest.raises(JobError, match="letters, digits"):
        plan_code(tmp_path, tmp_path, "x", "y", None, (data,))
    data = write(tmp_path, "stop.txt", "")
    code = plan_code(tmp_path / "none.py", write(tmp_path, "R.py", "def reduce(k, v):\n    return 0\n"),
                     f"{mapper} --stop 'stop.txt' \"a b\"", None, "awk '{print $1}'", (mapper, data))
    assert code.stages.map == CommandStage(("./mapper", "--stop", "stop.txt", "a b"), shipped=True)
    assert code.stages.combine == CommandStage(("awk", "{print $1}"), shipped=False)
    assert code.stages.reduce == PythonStage("Reduce.py")
    assert code.files == {"mapper": mapper, "stop.txt": data, "Reduce.py": tmp_path / "R.py"}
    piped = plan_code(tmp_path / "M.py", tmp_path / "R.py", "cat | rm -rf / > out", "cat", None, ())
    assert piped.stages.map == CommandStage(("cat", "|", "rm", "-rf", "/", ">", "out"), shipped=False)  # no shell


@pytest.mark.parametrize(("mapper", "combiner", "files", "error"), [
    ("awk '{print}", None, (), "No closing quotation"),
    ("", None, (), "names no program"),
    ("bin/mapper", None, (), r"not shipped with the job: add --file bin/mapper"),
    (None, "sort", (), "--combiner runs on a command mapper's output"),
    ("cat", None, ("a/x", "b/x"), "have the same name 'x'"),
    ("cat", None, ("Reduce.py",), "takes in its directory"),
])
def test_bad_command_lines_are_refused_with_what_to_fix(tmp_path: Path, mapper: str | None, combiner: str | None,
                                                       files: tuple[str, ...], error: str) -> None:
    paths = []
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        paths.append(write(tmp_path, name, ""))
    map_file = write(tmp_path, "Map.py", "def map(line):\n    return []\n")
    reduce_file = write(tmp_path, "R.py", "def reduce(k, v):\n    return 0\n")
    with pytest.raises(JobError, match=error):
        plan_code(map_file, reduce_file, mapper, None, combiner, tuple(paths))


def test_a_python_job_ships_map_py_and_reduce_py() -> None:
    from ipdc.jobs import shipped
    code = plan_code(shipped("mapreduce", "Map.py"), shipped("mapreduce", "Reduce.py"), None, None, None, ())
    assert code.stages == PYTHON_JOB
    assert list(code.files) == ["Map.py", "Reduce.py"]


@pytest.mark.parametrize(("role", "source"), [
    ("map", "def map(line):\n    yield line, 1\n"),
    ("map", "from collections import Counter\n\ndef map_chunk(text):\n    return Counter(text.split()).items()\n"),
    ("map", "def map(line, *rest):\n    return []\n\ndef combine(key, values, extra=0):\n    return sum(values)\n"),
    ("map", "map = lambda line: []\n"),
    ("map", "from mylib import map\n"),
    ("reduce", "def reduce(key, values, /):\n    return sum(values)\n"),
    ("reduce", "import operator\nreduce = operator.add\n"),
    ("map", "def map(line, path):\n    return [(path, 1)]\n"),
    ("map", "def map_chunk(text, path):\n    return [(path, 1)]\n"),
])
def test_good_job_files_pass(tmp_path: Path, role: str, source: str) -> None:
    check_python(write(tmp_path, "job.py", source), role)


@pytest.mark.parametrize(("role", "source", "error"), [
    ("map", "def map(line:\n    pass\n", r"job\.py, line 1: syntax error: "),
    ("map", "x = 1\n\n\ndef mapper(line):\n    return []\n", r"defines no top-level function map\(line\) or "
                                                               r"map_chunk\(text\)"),
    ("map", "class Job:\n    def map(self, line):\n        return []\n", "defines no top-level function"),
    ("map", "if True:\n    def map(line):\n        return []\n", "defines no top-level function"),
    ("map", "\n\ndef map(key, line, path):\n    return []\n", r"line 3: `map` takes 3 positional argument\(s\), "
                                                             r"but it is called as map\(line\) or map\(line, path\)"),
    ("map", "def map():\n    return []\n", r"line 1: `map` takes 0 positional"),
    ("map", "def map(line):\n    return []\n\ndef combine(values):\n    return 0\n",
     r"line 4: `combine` takes 1 positional argument\(s\), but it is called as combine\(key, values\)"),
    ("map", "async def map(line):\n    return []\n", "is `async def`"),
    ("map", "def map(line, *, sep):\n    return []\n", "keyword-only sep"),
    ("map", "map = lambda: []\n", r"line 1: `map` takes 0"),
    ("reduce", "def reduce(key):\n    return 0\n", r"`reduce` takes 1 positional argument\(s\), but it is called "
                                                  r"as reduce\(key, values\)"),
    ("reduce", "def map(line):\n    return []\n", r"defines no top-level function reduce\(key, values\)"),
    ("reduce", "def reduce(key, values):\n\treturn 0\n        pass\n", "line 3: syntax error"),
])
def test_bad_job_files_name_the_file_line_and_fault(tmp_path: Path, role: str, source: str, error: str) -> None:
    path = write(tmp_path, "job.py", source)
    with pytest.raises(JobError, match=error) as raised:
        check_python(path, role)
    assert str(path) in str(raised.value)


def test_a_job_file_that_is_not_python_source(tmp_path: Path) -> None:
    path = tmp_path / "Map.py"
    path.write_bytes(b"def map(line):\n    return '\xff'\n")
    with pytest.raises(JobError, match=str(path)):
        check_python(path, "map")


def test_the_interpreter_runs_the_example_reducer() -> None:
    """The shipped sum_reduce.py is the README's example: it sums sorted lines of raw bytes."""
    import subprocess

    from ipdc.jobs import shipped
    done = subprocess.run([sys.executable, str(shipped("streaming", "sum_reduce.py"))],
                          input=b"a\t1\na\t2\nb\xff\t5\n", capture_output=True, check=True)
    assert done.stdout == b"a\t3\nb\xff\t5\n"


def test_a_streaming_job_is_recorded_and_rebuilt_whole(tmp_path: Path) -> None:
    """The controller service records a job's parameters and rebuilds the job from them when
    it is restarted; a record made before streaming existed is a Python job."""
    from ipdc.control.jobrun import job_of, job_params
    from ipdc.submit.mapreduce import MapReduceJob

    job = MapReduceJob(tmp_path / "in.txt", k=2, mapper="awk '{print $1}'", combiner="./sum", reducer="sort -u",
                       files=(tmp_path / "sum", tmp_path / "stop.txt"), output=tmp_path / "out")
    assert job_of(job_params(job), str(tmp_path / "out")) == job
    old = {k: v for k, v in job_params(job).items() if k not in ("mapper", "reducer", "combiner", "files")}
    assert job_of(old, str(tmp_path / "out")) == MapReduceJob(tmp_path / "in.txt", k=2, output=tmp_path / "out")
