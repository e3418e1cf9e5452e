#!/usr/bin/env python3
"""Install, start and stop this machine's IPDC node.

    python deploy.py init [--host ADDR] [--join-file FILE | --join -] [--with-tf]
    python deploy.py start | stop | status
    python deploy.py install          # binaries only (mosquitto, its plugin, kubo), no node

The node lives in $IPDC_HOME (default ~/.ipdc). These are the `ipdc node ...`
commands; this script exists so a fresh clone works before `ipdc` is on PATH.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ensure_python_deps(with_tf: bool) -> None:
    """pip install this project (editable) when its dependencies are missing."""
    missing = any(importlib.util.find_spec(m) is None for m in ("click", "httpx", "paho", "rich", "yaml"))
    extras = "[tf]" if with_tf else ""
    if missing or with_tf:
        print(f"installing IPDC's Python dependencies (pip install -e .{extras})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{HERE}{extras}"], check=True)


def main() -> None:
    args = sys.argv[1:]
    with_tf = "--with-tf" in args
    args = [a for a in args if a != "--with-tf"]
    _ensure_python_deps(with_tf)
    sys.path.insert(0, str(HERE))
    from ipdc.cli import main as cli
    from ipdc.node.install import ensure_kubo, ensure_plugin

    if args[:1] == ["install"]:
        print(f"broker plugin: {ensure_plugin()}")  # installs mosquitto and the build tools first
        print(f"kubo: {ensure_kubo()}")
        if os.geteuid() == 0:  # sandboxes run under uids of their own: they need a Python they can read
            from ipdc.isolation.interpreter import for_sandbox

            print(f"sandbox python: {for_sandbox(separate_uid=True, prune=True).executable}")
        return
    cli.main(args=["node", *args], prog_name="deploy.py")


if __name__ == "__main__":
    main()
