"""The training, log-prob and attention benchmarks' --quick runs (tiny shapes, CPU): they run end to end,
measure both sides of their comparison on the same work, and report figures a RESULTS.md row can trust."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start_quick_run(script: str, *arguments: str) -> subprocess.Popen:
    command = [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", *arguments]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_quick_run(process: subprocess.Popen):
    """(JSON rows, markdown rows) that the run printed."""
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    lines = stdout.splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    return rows, [line for line in lines if line.startswith("| ")]


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_train_profile")


@pytest.fixture(scope="module")
def quick_runs(profile_dir):
    """The benchmarks' --quick runs, side by side (each is single-threaded: two cores, a shorter wait)."""
    processes = [_start_quick_run("bench_train.py", "--profile-dir", str(profile_dir)),
                 _start_quick_run("bench_logprob.py"), _start_quick_run("bench_attention.py")]
    try:
        return tuple(_finish_quick_run(process) for process in processes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def train_run(quick_runs):
    return quick_runs[0]


@pytest.fixture(scope="module")
def logprob_run(quick_runs):
    return quick_runs[1]


@pytest.fixture(scope="module")
def attention_run(quick_runs):
    return quick_runs[2]


def test_train_reports_both_sides_of_both_workloads(train_run):
    """Invariant: each workload row has positive, finite throughput, MFU, step and phase times for ours and
    HF, finite non-negative peak memory, and a markdown row."""
    rows, markdown = train_run
    assert [row["workload"] for row in rows] == ["fixed", "variable"]
    assert len(markdown) == len(rows) and all("| cpu |" in line for line in markdown)
    for row in rows:
        for side in ("ours", "hf"):
            for key in ("tokens_per_s", "mfu", "step_s", "forward_s", "backward_s", "optimizer_s"):
                assert _positive_finite(row[f"{side}_{key}"]), (row["workload"], side, key, row[f"{side}_{key}"])
            assert math.isfinite(row[f"{side}_peak_gib"]) and row[f"{side}_peak_gib"] >= 0
        assert _positive_finite(row["matmul_peak_tflops"])


def test_train_profiles_one_step_per_side_and_workload(train_run, profile_dir):
    """Invariant: --profile-dir leaves a Chrome trace per side and workload, their operator tables and their
    summaries (with the GPU's idle stretches, none on the CPU)."""
    names = {f"{side}_{workload}" for side in ("ours", "hf") for workload in ("fixed", "variable")}
    assert {path.name for path in profile_dir.glob("*.json.gz")} == {f"{name}.json.gz" for name in names}
    tables = (profile_dir / "profile.txt").read_text()
    assert all(f"== {name}:" in tables for name in names)
    summaries = [json.loads(line) for line in tables.splitlines() if line.startswith("{")]
    assert len(summaries) == len(names)
    assert all(summary["largest_idle_gaps"] == [] and summary["idle_ms_by_range"] == {} and summary["kernels"] == 0
               for summary in summaries)


def test_train_speedup_is_the_quotient_of_the_throughputs(train_run):
    """Invariant: the reported ratio is ours / HF tokens per second, nothing else."""
    for row in train_run[0]:
        assert row["speedup"] == pytest.approx(row["ours_tokens_per_s"] / row["hf_tokens_per_s"], abs=1e-3)


def test_train_sides_start_from_the_same_model_and_tokens(train_run):
    """Invariant: both sides train the same weights on the same sequences: their first-step policy losses
    agree (fp32), and the throughput counts the same real tokens, HF's padding aside."""
    for row in train_run[0]:
        assert abs(row["ours_first_loss"] - row["hf_first_loss"]) < 1e-5, row["workload"]
        assert row["ours_computed_tokens_per_step"] == row["tokens_per_step"]  # packed: no padding
        assert row["hf_computed_tokens_per_step"] >= row["tokens_per_step"]
    fixed, variable = train_run[0]
    assert fixed["hf_computed_tokens_per_step"] == fixed["tokens_per_step"]  # equal lengths need no padding
    assert variable["hf_computed_tokens_per_step"] > variable["tokens_per_step"]
    assert variable["ours_micro_batches"] < variable["hf_micro_batches"]  # packing fills micro-batches


def test_logprob_reports_time_and_memory_of_every_method(logprob_run):
    """Invariant: forward and backward times are positive and finite, the added memory finite and
    non-negative, and ours' and the chunked log-probs and entropies equal the naive ones."""
    (row,), markdown = logprob_run
    assert len(markdown) == 1
    for method in ("ours", "chunked", "naive"):
        assert _positive_finite(row[f"{method}_forward_ms"]) and _positive_finite(row[f"{method}_backward_ms"])
        for phase in ("forward", "backward"):
            added = row[f"{method}_{phase}_added_gib"]
            assert math.isfinite(added) and added >= 0
    for method in ("ours", "chunked"):
        assert row[f"{method}_max_abs_logprob_difference"] < 1e-4
        assert row[f"{method}_max_abs_entropy_difference"] < 1e-4
    assert row["chunk_tokens"] < row["tokens"]  # the quick run crosses chunk boundaries


def test_logprob_speedups_are_quotients_of_the_times(logprob_run):
    """Invariant: the reported ratios are the other method's milliseconds over ours'."""
    (row,), _ = logprob_run
    for name in ("chunked", "naive"):
        for phase in ("forward", "backward"):
            assert row[f"{phase}_speedup_over_{name}"] == pytest.approx(
                row[f"{name}_{phase}_ms"] / row[f"ours_{phase}_ms"], abs=1e-3)


def test_attention_reports_every_workload_with_the_exact_result(attention_run):
    """Invariant: each workload's row times ours and the per-sequence loop on the same tensors, ours' output
    equals the loop's (fp32 on the CPU), and the speedups are the loop's milliseconds over ours'."""
    rows, markdown = attention_run
    assert [row["workload"] for row in rows] == ["fixed", "ragged", "windows", "images"] and len(markdown) == 4
    for row in rows:
        assert row["ours_max_abs_difference"] < 1e-5
        for phase in ("forward", "forward_backward"):
            assert _positive_finite(row[f"ours_{phase}_ms"])
            assert row[f"{phase}_speedup_over_segments"] == pytest.approx(
                row[f"segments_{phase}_ms"] / row[f"ours_{phase}_ms"], abs=2e-3)
