"""Loopback-only network namespaces for TF processes, with bubblewrap.

A TF server binds every interface and runs any graph it is sent, so no TF process
of IPDC shares a network namespace with the node: a server, and the chief that
``ipdc tf run`` starts, each get one of their own that holds only loopback. bwrap
makes one without root where the kernel allows unprivileged user namespaces; where
it cannot, :func:`isolation_problem` says why, and TF is refused unless the node's
``tf.trusted_network`` accepts the risk (:func:`refusal`).
"""

from __future__ import annotations

import functools
import os
import subprocess

from ipdc.isolation.bwrap import BWRAP


@functools.cache
def isolation_problem() -> str:
    """Why this node cannot give a TF process a network namespace of its own ("" when it can)."""
    if not os.access(BWRAP, os.X_OK):
        return f"{BWRAP} is missing: install bubblewrap (apt-get install bubblewrap)"
    try:
        done = subprocess.run([BWRAP, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap failed to run ({exc})"
    if done.returncode != 0:
        return (f"bwrap cannot create namespaces here ({done.stderr.strip()[:200]}); unprivileged user "
                "namespaces may be off (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, "
                "or AppArmor's kernel.apparmor_restrict_unprivileged_userns)")
    return ""


def refusal(node: str, problem: str) -> str:
    """The message that refuses a TF task on ``node`` because of ``problem``."""
    return (f"{node} refuses TensorFlow tasks: it cannot put them in a loopback-only network "
            f"namespace, because {problem}. A TF server executes any graph it is sent, from anyone "
            "who reaches its port (TensorFlow's SECURITY.md), and without a namespace it listens on "
            "every interface. Fix the cause, or, if everyone who can reach this node's network may "
            "run code on it, set `tf: {trusted_network: true}` in its ipdc.conf")


def chief_argv() -> list[str]:
    """A namespace for the user's own script: the whole file system as it is, but a network
    with loopback only, and its own pids (so nothing of it outlives ``ipdc tf run``)."""
    return [BWRAP, "--dev-bind", "/", "/", "--unshare-net", "--unshare-pid", "--die-with-parent",
            "--proc", "/proc"]

