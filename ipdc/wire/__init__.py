"""The MQTT channels of IPDC: one module per channel, each a topic pattern plus a
strictly validated message type.

Topics:

    ipdc/presence/<node>          Presence   retained; cleared by the node's last will
    ipdc/heartbeat/<node>         Heartbeat  every agent.heartbeat_interval seconds
    ipdc/peer/<node>/download     Download   job manifest; the agent fetches the code
    ipdc/peer/<node>/domap        DoMap      run one map task
    ipdc/peer/<node>/buffer       Buffer     a map output partition for this reducer
    ipdc/peer/<node>/cleanup      CleanUp    drop a finished job's files and runners
    ipdc/peer/<node>/tf           Tf         start or stop this node's part of a TF cluster
    ipdc/peer/<node>/renew        Renew      the job's owner is alive: its lease goes on
    ipdc/peer/<node>/logs         Logs       send your log lines of a job (answered by CID)
    ipdc/peer/<node>/task         Task       call a Python function (ipdc.api)
    ipdc/result/<node>/<job>      GetResult  a worker's report to the job's owner
    ipdc/result/<node>/<job>/logs GetResult  a worker's log lines of the job, as a CID
    ipdc/result/<node>/<job>/record JobRecord retained: a finished job's signed result CID
    ipdc/cache/<key>/<node>       CacheRecord retained: the signed result CID of a job's cache key
    ipdc/result/<node>/<session>/task TaskReply a Python API task's result, signed by the worker

Membership (:mod:`ipdc.wire.membership`): ``ipdc/enroll/<id>/request|reply``,
``ipdc/removed/<node>`` and ``ipdc/swarmkey/<node>``.

The package imports nothing itself, so that importing one of its modules costs that
module: importing every channel with it took ~40 ms (``python -X importtime``). The
agent's inbox is :mod:`ipdc.wire.inbox`.
"""
