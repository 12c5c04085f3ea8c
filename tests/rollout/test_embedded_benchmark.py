"""The rollout benchmark's --quick mode runs end to end on the CPU (so the GPU run will not die on a typo)."""
import importlib.util
import os

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_rollout.py")


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("bench_rollout", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_benchmark_times_engine_and_hf_generate(capsys):
    """--quick times the three workloads (text, image, RL-shaped) for the engine and HF generate (and the RL one
    for the engine's static batches) and prints a RESULTS.md row each."""
    bench = _benchmark_module()
    rows = bench.main(["--quick"])
    assert [row["workload"] for row in rows] == ["text", "image", "rl"]
    for row in rows:
        assert row["engine_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["speedup"] > 0
    assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]  # the image pads are in the prompt
    assert 0 < rows[0]["decode_floor_fraction"] and 0 < rows[1]["decode_floor_fraction"]
    rl = rows[2]
    assert rl["static_tokens_per_s"] > 0 and rl["speedup_over_static"] > 0
    assert rl["new_tokens"] == rl["samples"] * rl["mean_new_tokens"] * rl["prompts"]  # every drawn length, exactly
    assert capsys.readouterr().out.count("| cpu |") == 3


def test_quick_rl_profile_times_admissions_and_steps_by_width():
    """--profile on the RL workload adds each batching mode's admissions (prefill calls and their seconds) and
    decode-step costs by batch width and cached length."""
    bench = _benchmark_module()
    [row] = bench.main(["--quick", "--workload", "rl", "--skip-hf", "--profile"])
    for mode in ("engine", "static"):
        assert row[f"{mode}_admissions"]["prefill_calls"] >= 1 and row[f"{mode}_admissions"]["admission_seconds"] > 0
    assert row["step_ms_by_width_x_length"] and all(ms > 0 for ms in row["step_ms_by_width_x_length"].values())
