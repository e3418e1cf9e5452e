"""Multi-host tests: a broker host and three workers, each in its own network namespace."""
