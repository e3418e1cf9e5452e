"""What runs each stage of a MapReduce job: a Python file, or a command (Hadoop Streaming).

The submitter writes the stages into the signed manifest (``params["stages"]``), the
agent hands them to the job's runner with its code, and the runner runs them. So this
module is the one definition all three read; it is shipped into the sandbox (see
:data:`ipdc.isolation.bwrap.SHIPPED`). In the manifest::

    {"map":     {"kind": "python", "file": "Map.py"},
     "combine": {"kind": "command", "argv": ["./sum", "-c"], "shipped": true},
     "reduce":  {"kind": "command", "argv": ["awk", "{...}"], "shipped": false}}

A command's ``argv`` is never given to a shell. ``shipped``: ``argv[0]`` is ``./NAME``, a
file of the job's code (its work dir is the task's cwd); otherwise it is looked up on the
``PATH`` inside the worker's sandbox. A manifest without stages is a Python job with
``Map.py`` and ``Reduce.py``; its combine is Map.py's ``combine``, when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ipdc.errors import MessageError

ROLES = ("map", "combine", "reduce")
#: Bounds on a command line, which travels in every copy of the manifest over MQTT.
MAX_ARGS = 256
MAX_ARGV_BYTES = 16 << 10


@dataclass(frozen=True)
class PythonStage:
    """A stage run by a Python file's functions (``map``/``map_chunk``/``combine``, ``reduce``)."""

    file: str


@dataclass(frozen=True)
class CommandStage:
    """A stage run by a program: lines on its stdin, ``key<TAB>value`` lines on its stdout."""

    argv: tuple[str, ...]
    shipped: bool
    """``argv[0]`` is ``./NAME``, a file of the job's code, rather than a program on the PATH."""

    @property
    def program(self) -> str:
        """The program as the user named it, for messages."""
        return self.argv[0].removeprefix("./") if self.shipped else self.argv[0]

    @property
    def line(self) -> str:
        """The command line, for messages (quoted only for reading: it never meets a shell)."""
        return " ".join(a if a and all(c.isalnum() or c in "./_-=" for c in a) else repr(a) for a in self.argv)


Stage = PythonStage | CommandStage


@dataclass(frozen=True)
class Stages:
    map: Stage
    reduce: Stage
    combine: CommandStage | None = None
    """A command combiner; a Python mapper combines with its file's ``combine`` instead."""

    @property
    def streaming(self) -> bool:
        return any(isinstance(s, CommandStage) for s in (self.map, self.reduce))

    def to_params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role in ROLES:
            stage = getattr(self, role)
            if isinstance(stage, PythonStage):
                out[role] = {"kind": "python", "file": stage.file}
            elif isinstance(stage, CommandStage):
                out[role] = {"kind": "command", "argv": list(stage.argv), "shipped": stage.shipped}
        return out


PYTHON_JOB = Stages(PythonStage("Map.py"), PythonStage("Reduce.py"))


def stages_of(params: Any, files: frozenset[str] | set[str]) -> Stages:
    """The stages a manifest's ``params["stages"]`` names (None: the Python job), checked
    against the job's code ``files``; :class:`~ipdc.errors.MessageError` when malformed (it came in a message)."""
    if params is None:
        return PYTHON_JOB
    if not isinstance(params, dict) or set(params) - set(ROLES) or not {"map", "reduce"} <= set(params):
        raise MessageError(f"job stages: expected map, reduce and an optional combine, not {params!r:.200}")
    found = {role: _stage(role, params[role], files) for role in params}
    combine = found.get("combine")
    if combine is not None and not (isinstance(combine, CommandStage) and isinstance(found["map"], CommandStage)):
        raise MessageError("job stages: a combine stage must be a command, after a command mapper")
    return Stages(found["map"], found["reduce"], combine)


def _stage(role: str, spec: Any, files: frozenset[str] | set[str]) -> Stage:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "python" and isinstance(spec.get("file"), str) and spec["file"] in files:
        return PythonStage(spec["file"])
    if kind == "command":
        argv, shipped = spec.get("argv"), spec.get("shipped")
        if (isinstance(argv, list) and 0 < len(argv) <= MAX_ARGS and all(isinstance(a, str) for a in argv)
                and isinstance(shipped, bool) and argv[0]
                and sum(len(a.encode("utf-8", "surrogatepass")) for a in argv) <= MAX_ARGV_BYTES
                and not any("\0" in a for a in argv)
                and (not shipped or (argv[0].startswith("./") and argv[0][2:] in files))):
            return CommandStage(tuple(argv), shipped)
    raise MessageError(f"job stages: malformed {role} stage {spec!r:.200}")
