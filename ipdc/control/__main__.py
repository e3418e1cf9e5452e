"""``python -m ipdc.control``: the node's controller service (started by ``ipdc node start``)."""

import sys

# As in the agent: httpcore imports trio whenever it is installed, and nothing here uses it.
sys.modules.setdefault("trio", None)  # type: ignore[arg-type]

from ipdc.control.service import main  # noqa: E402

main()
