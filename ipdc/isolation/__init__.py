"""The pieces of the user-code sandbox, below :mod:`ipdc.spawn` (its one entry point).

* :mod:`~ipdc.isolation.spec`: what a sandboxed process runs and its limits;
* :mod:`~ipdc.isolation.bwrap`: the bubblewrap command line for a spec;
* :mod:`~ipdc.isolation.seccomp`: the system-call filter bubblewrap loads;
* :mod:`~ipdc.isolation.cgroups`: memory, pids and CPU groups (cgroup v1 or v2);
* :mod:`~ipdc.isolation.interpreter`: the Python the sandbox runs, readable by its uid;
* :mod:`~ipdc.isolation.zygote`: the single-threaded process that starts sandboxes;
* :mod:`~ipdc.isolation.kernel`: the few prctl calls the standard library lacks.

Stdlib only: the zygote imports these without the agent's dependencies.
"""
