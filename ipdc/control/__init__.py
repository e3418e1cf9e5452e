"""The controller service: one per node, next to the agent, where the jobs this node
submits are run, recorded and shown.

* :mod:`~ipdc.control.service`: the process (``python -m ipdc.control``), started by
  ``ipdc node start`` and by a local cluster; it runs each job's controller, so a job
  outlives the terminal that submitted it, and resumes jobs after a restart;
* how the CLI talks to it, over a unix socket in the node's home, is
  :mod:`ipdc.ctlsock`: kept outside this package and light, as the CLI and the node
  tooling load it;
* :mod:`~ipdc.control.history`: the job history in SQLite (``$IPDC_HOME/ipdc.db``);
* :mod:`~ipdc.control.jobrun`: one job inside the service, recorded as it goes;
* :mod:`~ipdc.control.swarm`: log lines and result records asked of the swarm;
* :mod:`~ipdc.control.dashboard`: the live web dashboard (``ipdc dashboard``).
"""
