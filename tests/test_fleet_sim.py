"""The scheduling simulation (benchmarks/fleet_sim.py) as a regression check on Kiln's own queue choice, card
classes and model affinity: a mixed fleet finishes a mixed batch near the lower bound, each worker loading each
model at most once or twice."""

from __future__ import annotations

import random

from benchmarks import fleet_sim


def test_a_simulated_mixed_fleet_finishes_within_ten_percent_of_the_lower_bound() -> None:
    jobs = fleet_sim.batch(3000, random.Random(7))
    workers = fleet_sim.fleet()
    bound = fleet_sim.lower_bound(jobs, workers)
    makespan, done = fleet_sim.kiln(jobs, workers)
    assert sum(done.values()) == len(jobs)  # the switched-off worker's job came back and was done
    assert makespan <= 1.10 * bound, f"{makespan / bound:.2f}x the lower bound"
    assert all(w.loads <= 2 for w in workers), {w.name: w.loads for w in workers}
    fifo_makespan, _ = fleet_sim.fifo(jobs, workers)
    assert makespan < fifo_makespan
