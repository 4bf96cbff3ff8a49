"""bench/cluster_sim.py runs on the committed result files and ranks routing the way docs/routing.md says."""
from __future__ import annotations

from bench.cluster_sim import measured_costs, simulate


def test_patch_routing_beats_random_on_slot_hits():
    costs = measured_costs()

    def run(policy):
        return simulate(replicas=8, patches=100, zipf=0.8, policy=policy, factor=1.5, requests=3000, costs=costs)
    rand, chbl = run("random"), run("chbl")
    assert 0 < rand["hit_rate"] < chbl["hit_rate"] <= 1
    assert chbl["swap_ins_per_s"] < rand["swap_ins_per_s"] and chbl["added_p95_ms"] < rand["added_p95_ms"]
