#!/usr/bin/env python3
"""Install, start and stop this machine's IPDC node.

    python deploy.py init [--host ADDR] [--join-file FILE | --join -] [--with-tf]
    python deploy.py start | stop | status
    python deploy.py install          # binaries only (mosquitto, its plugin, bubblewrap, kubo), no node
    python deploy.py install --test-tools   # ... and what the test suite drives (root: apt, dockerd)

The node lives in $IPDC_HOME (default ~/.ipdc). These are the `ipdc node ...`
commands; this script exists so a fresh clone works before `ipdc` is on PATH.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ensure_python_deps(with_tf: bool) -> None:
    """pip install this project (editable) when its dependencies are missing."""
    missing = any(importlib.util.find_spec(m) is None for m in ("click", "httpx", "paho", "rich", "yaml"))
    extras = "[tf]" if with_tf else ""
    if missing or with_tf:
        print(f"installing IPDC's Python dependencies (pip install -e .{extras})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{HERE}{extras}"], check=True)


#: Debian packages the test suite drives beyond a node's own: network namespaces, Docker and
#: docker-compose with debootstrap for the base image, the browser of the dashboard test.
TEST_TOOLS = {"ip": "iproute2", "dockerd": "docker.io", "docker-compose": "docker-compose",
              "debootstrap": "debootstrap", "chromium": "chromium", "chromedriver": "chromium-driver"}
#: The unprivileged user the tests run agents as, to attack the sandbox from a non-root node.
TEST_USER = "ipdcagent"


def _ensure_test_tools() -> None:
    """apt-get install the missing test tools, add the tests' unprivileged agent user, then
    start dockerd when it does not answer (a container or a machine without systemd has
    nobody else to start it)."""
    from ipdc.node.install import install_packages

    install_packages([package for command, package in TEST_TOOLS.items() if shutil.which(command) is None])
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        TEST_USER], check=True)
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0:
        return
    with open("/var/log/dockerd.log", "ab") as log:
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        if time.monotonic() > deadline:
            sys.exit("dockerd did not answer within 60 s: see /var/log/dockerd.log")
        time.sleep(0.5)


def main() -> None:
    args = sys.argv[1:]
    with_tf = "--with-tf" in args
    test_tools = "--test-tools" in args
    args = [a for a in args if a not in ("--with-tf", "--test-tools")]
    _ensure_python_deps(with_tf)
    sys.path.insert(0, str(HERE))
    from ipdc.cli import main as cli
    from ipdc.node.install import ensure_bubblewrap, ensure_kubo, ensure_plugin

    if args[:1] == ["install"]:
        print(f"broker plugin: {ensure_plugin()}")  # installs mosquitto and the build tools first
        print(f"sandbox: {ensure_bubblewrap()}")
        print(f"kubo: {ensure_kubo()}")
        if os.geteuid() == 0:  # sandboxes run under uids of their own: they need a Python they can read
            from ipdc.isolation.interpreter import for_sandbox

            print(f"sandbox python: {for_sandbox(separate_uid=True, prune=True).executable}")
        if test_tools:
            _ensure_test_tools()
        return
    cli.main(args=["node", *args], prog_name="deploy.py")


if __name__ == "__main__":
    main()
