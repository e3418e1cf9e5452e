"""``python -m ipdc.runner CONTROL_FD``: the fork server of one agent's runner pool."""

from ipdc.runner.process import main

main()
