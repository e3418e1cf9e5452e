"""``python -m ipdc.agent``: the node's agent, as ``ipdc node start`` runs it."""

from ipdc.agent.agent import main

main()
