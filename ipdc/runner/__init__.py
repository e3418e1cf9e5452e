"""The user-code side: processes that load a job's code and run its tasks.

Nothing here runs in the agent. These modules are imported inside the sandbox,
so they import as little as they can.
"""
