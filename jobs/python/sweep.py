"""A parameter sweep on the swarm: the damping and stiffness of a spring that settle it fastest.

    python jobs/python/sweep.py

Each task simulates one (damping, stiffness) pair; ``swarm.map`` runs the grid in
order, and the best pair is printed. With no node running, ipdc.connect() starts a
temporary local cluster for the run.
"""

from __future__ import annotations

import itertools

import ipdc


def settling_time(params: tuple[float, float], dt: float = 1e-3, limit: float = 20.0) -> float:
    """Seconds until a unit-mass spring released at x=1 stays within 2% of rest
    (semi-implicit Euler); ``limit`` when it never does within it."""
    damping, stiffness = params
    x, v, t, last_outside = 1.0, 0.0, 0.0, 0.0
    while t < limit:
        v += (-stiffness * x - damping * v) * dt
        x += v * dt
        t += dt
        if abs(x) > 0.02:
            last_outside = t
    return round(last_outside, 3)


def main() -> None:
    grid = list(itertools.product([0.5, 1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 4.0, 8.0, 16.0]))
    with ipdc.connect() as swarm:
        times = list(swarm.map(settling_time, grid, chunksize=5))
    best_time, best = min(zip(times, grid, strict=True))
    for params, seconds in zip(grid, times, strict=True):
        print(f"damping {params[0]:>4}  stiffness {params[1]:>5}  settles in {seconds:6.3f} s")
    print(f"best: damping {best[0]}, stiffness {best[1]} ({best_time} s)")


if __name__ == "__main__":
    main()
