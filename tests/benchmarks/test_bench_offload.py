"""The offload benchmark's --quick run (tiny model, CPU): it runs end to end through the trainer's build and
offload code, and what it moves is what the memory planner counts for the same run."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = float(1 << 30)


@pytest.fixture(scope="module")
def quick_run():
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_offload.py"), "--quick"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    [summary] = [json.loads(line) for line in lines if line.startswith("{")]
    return summary, [line for line in lines if line.startswith("| ")]


def test_moved_bytes_are_the_planned_components(quick_run):
    """Invariant: each component's bytes moved (optimizer states, gradient buffers, weights) are the planner's
    figure for it within 1% (Adam's per-tensor step counters are the only bytes the plan leaves out)."""
    from mmrl_megatron.parallel.memory_plan import ACTOR_COMPONENTS

    summary, _ = quick_run
    planned = summary["offload"]["planned_components_gib"]["training"]
    assert sorted(summary["round_trip"]) == sorted(ACTOR_COMPONENTS)
    for kind, timing in summary["round_trip"].items():
        assert timing["gigabytes"] * 1e9 == pytest.approx(planned[ACTOR_COMPONENTS[kind]] * GIB, rel=0.01), kind


def test_offload_run_plans_states_away_and_reports_timings(quick_run):
    """Invariant: the offload run's plan has no optimizer states during rollout and the plain run's has them;
    both runs take finite training steps after the round trip; every timing and bandwidth is positive and
    finite, and a RESULTS.md row is printed."""
    summary, rows = quick_run
    assert summary["offload"]["planned_components_gib"]["rollout"]["optimizer states"] == 0
    assert summary["plain"]["planned_components_gib"]["rollout"]["optimizer states"] > 0
    assert math.isfinite(summary["offload"]["loss"]) and math.isfinite(summary["plain"]["loss"])
    assert summary["offload"]["first_offload_s"]["optimizer states"] > 0
    for timing in summary["round_trip"].values():
        assert all(math.isfinite(timing[key]) and timing[key] > 0
                   for key in ("offload_s", "onload_s", "offload_gb_per_s", "onload_gb_per_s"))
    assert len(rows) == 1 and "bench_offload.py --quick" in rows[0]
