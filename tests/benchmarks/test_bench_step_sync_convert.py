"""The GRPO-step, weight-sync and conversion benchmarks' --quick runs (tiny model, CPU): each runs the same
code path as on the GPU or on a full-size checkpoint, and prints figures a RESULTS.md row can trust."""
import math

import pytest

from tests.benchmarks.test_bench_quick import _finish_quick_run, _start_quick_run


@pytest.fixture(scope="module")
def runs():
    """The three quick runs, two at a time (two cores)."""
    step = _start_quick_run("bench_step.py", "--profile-pass")
    sync = _start_quick_run("bench_sync.py")
    results = {"step": _finish_quick_run(step), "sync": _finish_quick_run(sync)}
    results["convert"] = _finish_quick_run(_start_quick_run("bench_convert.py"))
    return results


def test_step_reports_every_phase_and_the_throughput_they_add_up_to(runs):
    """Invariant: both steps ran through the trainer; the summary's phases are positive and fit inside the
    step time, and tokens/s/GPU is the step's tokens over its time."""
    rows, markdown = runs["step"]
    steps, summary = rows[:-1], rows[-1]
    assert [row["step"] for row in steps] == [1, 2]
    phases = ("generate_and_reward_s", "logprob_s", "update_s", "weight_sync_s")
    assert all(summary[phase] > 0 for phase in phases + ("step_s",))
    for row in steps:  # the summary rounds to 0.1 ms, so add up each step's own (unrounded) phases
        assert sum(row[f"time/{phase}"] for phase in phases) <= row["time/step_s"] * 1.01
    # the steady state is step 2 alone: its tokens over its time
    assert summary["tokens_per_s_per_gpu"] == pytest.approx(steps[1]["throughput/tokens_per_s_per_gpu"], rel=1e-3)
    assert summary["vs_published"] == pytest.approx(summary["tokens_per_s_per_gpu"] / 1800.0, abs=0.01)
    assert len(markdown) == 1 and "tokens/s/GPU" in markdown[0]


def test_step_profiles_one_scoring_pass_and_one_update_micro_batch(runs):
    """Invariant: --profile-pass times each pass alone and counts what the hot path is judged by; on the CPU
    no kernel runs, so the count and the busy share are 0, and the pass's tokens are the micro-batches'."""
    rows, _ = runs["step"]
    profile = rows[-1]["profile"]
    for name in ("scoring_pass", "update_micro_batch"):
        part = profile[name]
        assert part["wall_s"] > 0 and part["tokens"] > 0
        assert part["kernels"] == 0 and part["gpu_busy_fraction"] == 0.0
        assert part["host_syncs"] >= 0 and part["scalar_reads"] >= 1  # the update reads its statistics once
    assert profile["update_micro_batch"]["tokens"] <= profile["scoring_pass"]["tokens"]


def test_sync_moves_every_byte_and_verifies(runs):
    """Invariant: a sync moves the whole model (GB > 0 at a positive rate) and the engine's tensors verify."""
    [result], markdown = runs["sync"]
    assert result["gigabytes"] > 0 and result["seconds_median"] > 0 and result["verified_tensors"] > 0
    assert result["gb_per_s"] == pytest.approx(result["gigabytes"] / result["seconds_median"], rel=0.01)
    assert len(markdown) == 1


def test_convert_round_trip_is_exact_and_timed(runs):
    """Invariant: HF -> megatron -> HF is bit-exact and both directions report time, rate and peak memory."""
    [result], _ = runs["convert"]
    assert result["round_trip_difference"] is None
    for direction in ("hf_to_mcore", "mcore_to_hf"):
        figures = result[direction]
        assert all(math.isfinite(v) and v > 0 for v in figures.values()), (direction, figures)
