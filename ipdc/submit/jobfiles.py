"""A job's code, checked on the submitting node before anything is sent.

Two kinds of stage (see :mod:`ipdc.wire.stages`):

* a **Python file** is checked on its syntax tree, never run here: it must parse and
  define its functions at top level with arguments they can be called with
  (``map(line)`` or ``map_chunk(text)``, an optional ``combine(key, values)``,
  ``reduce(key, values)``); an error names the file, the line and what is wrong;
* a **command** (``--mapper``/``--combiner``/``--reducer``) is split with :mod:`shlex`
  into an argv that never meets a shell. When its program's base name is the name of
  a ``--file``, that file runs (shipped with the job, from the task's working
  directory); otherwise the worker looks it up on the PATH inside its sandbox.

Every file of the job travels by CID under its base name, listed in the signed manifest.
"""

from __future__ import annotations

import ast
import os
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path

from ipdc.errors import JobError
from ipdc.wire.manifest import SAFE_NAME
from ipdc.wire.stages import CommandStage, PythonStage, Stages

#: What each function a job file may define is called with: its name and arguments.
SIGNATURES = {"map": ("line",), "map_chunk": ("text",), "combine": ("key", "values"), "reduce": ("key", "values")}
#: Arguments a stage may also take: the input file's path, when map (or map_chunk) has a
#: second parameter (see :func:`ipdc.runner.mapreduce.takes_path`).
OPTIONAL = {"map": ("path",), "map_chunk": ("path",)}
#: CPython 3.11 keeps the AST builder's recursion depth per interpreter, not per thread: two
#: threads parsing at once (two jobs submitted from one process) can fail with "AST
#: constructor recursion depth mismatch" (seen in CI; cf. python/cpython#106905), so parses
#: take turns.
_PARSE = threading.Lock()


@dataclass(frozen=True)
class JobCode:
    """What runs each stage, and the files the job ships: name in its work dir -> path here."""

    stages: Stages
    files: dict[str, Path]


def plan_code(map_file: Path, reduce_file: Path, mapper: str | None, reducer: str | None,
              combiner: str | None, files: tuple[Path, ...]) -> JobCode:
    """The job's stages and files, checked; JobError with what to fix otherwise.

    ``map_file``/``reduce_file`` are used for a stage without a command only.
    """
    shipped: dict[str, Path] = {}
    for path in files:
        name = path.name
        if not SAFE_NAME.fullmatch(name):
            raise JobError(f"--file {path}: a shipped file's name must be letters, digits, '_', '.' and '-', "
                           "not starting with '.' or '-'; rename it")
        if name in shipped:
            raise JobError(f"--file {path} and --file {shipped[name]} have the same name {name!r}; "
                           "a job's files share one directory, so rename one")
        _readable(path, "--file")
        shipped[name] = path
    if combiner is not None and mapper is None:
        raise JobError("--combiner runs on a command mapper's output: give --mapper too (a Python job "
                       "combines with combine(key, values) in its map file)")
    names = set(shipped)
    map_stage = _command("--mapper", mapper, names) if mapper is not None else _python(map_file, "map", shipped)
    reduce_stage = (_command("--reducer", reducer, names) if reducer is not None
                    else _python(reduce_file, "reduce", shipped))
    combine_stage = _command("--combiner", combiner, names) if combiner is not None else None
    return JobCode(Stages(map_stage, reduce_stage, combine_stage), shipped)


def _python(path: Path, role: str, shipped: dict[str, Path]) -> PythonStage:
    """A Python stage: the file, checked, shipped as Map.py or Reduce.py."""
    check_python(path, role)
    name = "Map.py" if role == "map" else "Reduce.py"
    if name in shipped:
        raise JobError(f"--file {shipped[name]} is named {name}, which the job's Python {role} file "
                       f"{path} takes in its directory; rename the --file")
    shipped[name] = path
    return PythonStage(name)


def _command(option: str, command: str, shipped: set[str]) -> CommandStage:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise JobError(f"{option} {command!r}: {exc} (it is split as a shell would, but never run by one)") \
            from None
    if not argv:
        raise JobError(f"{option} names no program")
    program = argv[0]
    name = os.path.basename(program)
    if name in shipped:
        return CommandStage((f"./{name}", *argv[1:]), shipped=True)
    if "/" in program and not program.startswith("/"):
        raise JobError(f"{option} runs {program}, which is not shipped with the job: add --file {program}")
    return CommandStage(tuple(argv), shipped=False)


def _readable(path: Path, what: str) -> None:
    if not path.is_file():
        raise JobError(f"{what} {path} does not exist (or is not a file)")
    if not os.access(path, os.R_OK):
        raise JobError(f"{what} {path} is not readable")


def check_python(path: Path, role: str) -> None:
    """Check a Python job file on its syntax tree (it is never run here).

    ``role`` "map": it defines ``map(line)`` or ``map_chunk(text)``, and ``combine(key,
    values)`` if anything named combine; "reduce": ``reduce(key, values)``. A name bound
    at top level another way (an assignment, an import) is taken on trust.
    """
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise JobError(f"cannot read job file {path}: {exc.strerror}") from None
    try:
        with _PARSE:
            tree = ast.parse(source, str(path))
    except SyntaxError as exc:
        raise JobError(f"job file {path}, line {exc.lineno}: syntax error: {exc.msg}") from None
    except ValueError as exc:  # null bytes, or not UTF-8 without a coding line
        raise JobError(f"job file {path} is not Python source: {exc}") from None
    bound = _top_level(tree)
    wanted = ("map", "map_chunk") if role == "map" else ("reduce",)
    if not any(name in bound for name in wanted):
        calls = " or ".join(f"{n}({', '.join(SIGNATURES[n])})" for n in wanted)
        raise JobError(f"job file {path} defines no top-level function {calls}")
    for name in (*wanted, "combine") if role == "map" else wanted:
        node = bound.get(name)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            _check_arguments(path, name, node)


def _top_level(tree: ast.Module) -> dict[str, ast.AST]:
    """Names bound at the top level of a module: to their def or lambda, else to the node
    that binds them. The last binding wins, as when the module runs."""
    bound: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    value = node.value
                    bound[target.id] = value if isinstance(value, ast.Lambda) else node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound[(alias.asname or alias.name).split(".")[0]] = node
    return bound


def _check_arguments(path: Path, name: str, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
    """JobError unless ``node`` can be called with its stage's positional arguments."""
    expected = SIGNATURES[name]
    optional = OPTIONAL.get(name, ())
    where = f"job file {path}, line {node.lineno}"
    if isinstance(node, ast.AsyncFunctionDef):
        raise JobError(f"{where}: `{name}` is `async def`; it must be a plain function {name}({', '.join(expected)})")
    args = node.args
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    missing_kw = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    n = len(expected)
    if required > n + len(optional) or (positional < n and args.vararg is None) or missing_kw:
        takes = f"{required}" if required == positional else f"{required} to {positional}"
        if args.vararg is not None:
            takes = f"at least {required}"
        extra = f" and keyword-only {', '.join(missing_kw)}" if missing_kw else ""
        calls = f"{name}({', '.join(expected)})" + (f" or {name}({', '.join((*expected, *optional))})"
                                                      if optional else "")
        raise JobError(f"{where}: `{name}` takes {takes} positional argument(s){extra}, but it is called "
                       f"as {calls}")
