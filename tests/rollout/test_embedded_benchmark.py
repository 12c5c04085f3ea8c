"""The rollout benchmark's --quick mode runs end to end on the CPU (so the GPU run will not die on a typo)."""
import importlib.util
import os

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_rollout.py")


def test_quick_benchmark_times_engine_and_hf_generate(capsys):
    """--quick times both workloads (text, image) for the engine and HF generate and prints a RESULTS.md row each."""
    spec = importlib.util.spec_from_file_location("bench_rollout", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick"])
    assert [row["workload"] for row in rows] == ["text", "image"]
    for row in rows:
        assert row["engine_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["speedup"] > 0
    assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]  # the image pads are in the prompt
    assert capsys.readouterr().out.count("| cpu |") == 2
