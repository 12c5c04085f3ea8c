"""Kimi-VL trained from verl parquet by launch/train.py: torchrun on 2 CPU ranks with
yaml_configs/grpo_kimivl_a3b_geo3k.yaml, overridden to a tiny Kimi-VL checkpoint, the embedded engine and
EP=2 (each rank holds half the experts and its own prompts). Nothing is a stand-in: the data path (Kimi
image processing and <|media_pad|> expansion), supervised warm-up, rollout, reward, reference, megatron
update and weight sync all run as in a real job."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGPROB_TOLERANCE = 1e-4

# a reward that varies with the sampled text, so GRPO groups have non-zero advantages and the policy loss a gradient
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return (sum(map(ord, solution_str)) % 7) / 6.0
'''


def _assets(root) -> None:
    """The tiny checkpoint and 8 training rows: 6 synthetic, one with a corrupt image, one 5x over the length limit."""
    from mmrl_megatron.data.format import write_rows
    from mmrl_megatron.data.synthetic import QUESTION, make_rows
    from mmrl_megatron.models.kimi_vl.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(str(root / "model"), seed=3)
    rows = make_rows(8, seed=0, split="train")
    rows[2]["images"] = [{"bytes": rows[2]["images"][0]["bytes"][:40]}]
    rows[5]["prompt"] = [{"role": "user", "content": "count " * 100 + "<image>" + "count " * 100 + QUESTION}]
    write_rows(str(root / "train.parquet"), rows)
    (root / "reward.py").write_text(REWARD)


def _launch(root) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581",
               "launch/train.py", "--config", "yaml_configs/grpo_kimivl_a3b_geo3k.yaml",
               f"model.hf_path={root}/model", "model.dtype=float32", "model.recompute=none", "parallel.expert=2",
               f"data.train_files=[{root}/train.parquet]", "data.val_files=[]", "data.prompts_per_step=4",
               "data.max_prompt_length=256", "data.overlong_prompt=truncate", "rollout.backend=embedded",
               "rollout.n=4", "rollout.max_new_tokens=8", "actor.micro_batch_tokens=1024",
               f"reward.function={root}/reward.py:compute_score", "reward.num_workers=1", "reward.format_weight=0",
               "trainer.steps=2", "trainer.warmup_sft_steps=1", "trainer.save_every=-1", f"trainer.run_dir={root}/run",
               "logging.wandb=false", "logging.plot_at_end=false"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def test_grpo_on_kimi_vl_from_parquet(tmp_path):
    """Invariant: the Kimi-VL YAML trains a Kimi-VL checkpoint from verl parquet on 2 CPU ranks at EP=2: a
    warm-up step and 2 GRPO steps finish with finite reward, loss and gradient norm (the gradient non-zero),
    the engine's log-probs of its samples (prompts with processed images) equal the actor's within 1e-4, and
    the data counters report the corrupt image (skipped), the over-long prompt (truncated) and the epoch."""
    _assets(tmp_path)
    result = _launch(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert math.isfinite(records[0]["warmup/sft_loss"])
    steps = [record for record in records if record["step"] > 0]
    assert [record["step"] for record in steps] == [1, 2]
    for record in steps:
        for key in ("reward/mean", "loss/policy", "kl/mean", "actor/grad_norm"):
            assert math.isfinite(record[key]), (record["step"], key)
        assert record["actor/grad_norm"] > 0
        assert record["rollout/logprob_abs_diff_max"] < LOGPROB_TOLERANCE
    counters = steps[-1]
    assert counters["data/skipped_undecodable_image"] >= 1 and counters["data/skipped_total"] >= 1
    assert counters["data/truncated"] >= 1
    assert counters["data/epoch"] >= 1  # 12 prompts (the warm-up's included) from 7 usable rows
