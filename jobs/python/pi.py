"""Monte-Carlo pi on the swarm: each task throws darts at the unit square with its own seed.

    python jobs/python/pi.py [TASKS] [DARTS_PER_TASK]

With no node running, ipdc.connect() starts a temporary local cluster for the run.
The seeds make the count exact: the same command gives the same digits anywhere.
"""

from __future__ import annotations

import random
import sys

import ipdc


def inside(seed: int, darts: int) -> int:
    """How many of ``darts`` random points fall inside the quarter circle."""
    rng = random.Random(seed)
    return sum(1 for _ in range(darts) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)


def main() -> None:
    tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    darts = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    with ipdc.connect() as swarm:
        futures = [swarm.submit(inside, seed, darts) for seed in range(tasks)]
        hits = sum(f.result() for f in ipdc.as_completed(futures))
        workers = sorted({f.peer for f in futures})
    print(f"inside: {hits} of {tasks * darts}")
    print(f"pi is about {4 * hits / (tasks * darts):.6f} ({tasks} tasks on {', '.join(workers)})")


if __name__ == "__main__":
    main()
