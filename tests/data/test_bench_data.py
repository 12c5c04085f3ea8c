"""benchmarks/bench_data.py --quick: the data-path benchmark runs and measures what it claims."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_data_quick():
    """Invariant: the smoke run processes 64 samples whose 448x448 images become 256 image tokens each
    (so the benchmark measures the workload it names) and reports a positive throughput."""
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_data.py"), "--quick"],
                               capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(completed.stdout.splitlines()[0])
    assert result["samples"] == 64 and result["image_tokens_per_sample"] == 256
    assert result["samples_per_s"] > 0 and result["process_s"] > 0
    assert completed.stdout.splitlines()[1].startswith("| ")
