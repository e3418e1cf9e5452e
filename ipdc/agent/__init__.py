"""The agent side: the worker of every job on this node.

It takes requests from its inbox on the broker, fetches what they name from kubo,
runs user code in sandboxed runners, and reports back. User code never runs here.
"""
