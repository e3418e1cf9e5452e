"""Files shipped with IPDC: the default WordCount job and its example input, a Hadoop
Streaming reducer (streaming/sum_reduce.py), and the TensorFlow example and spec. They
are package data, so a wheel install finds them as an editable one does."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped(*parts: str) -> Path:
    """The path of a shipped file. IPDC is installed as files, never run from a zip,
    so the resource is a real path that subprocesses and ``open`` can use."""
    return Path(str(files(__name__).joinpath(*parts)))
