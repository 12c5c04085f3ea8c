"""A tiny GRPO job launched as users launch it (torchrun on 2 CPU ranks, launch/train.py, a shipped YAML
overridden to a tiny checkpoint and a parquet file), and the health checks every such test makes."""
import json
import math
import os
import subprocess
import sys
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGPROB_TOLERANCE = 1e-4

# a reward that varies with the sampled text, so GRPO groups have non-zero advantages and the policy loss a gradient
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return (sum(map(ord, solution_str)) % 7) / 6.0
'''


def launch_tiny_grpo(root, yaml_config: str, master_port: int, overrides: Sequence[str]) -> subprocess.CompletedProcess:
    """Two GRPO steps after one warm-up step on root/model and root/train.parquet, rewarded by REWARD
    (written to root/reward.py); `overrides` add the family's layout and data settings."""
    (root / "reward.py").write_text(REWARD)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(master_port), "launch/train.py", "--config", yaml_config,
               f"model.hf_path={root}/model", "model.dtype=float32", "model.recompute=none",
               f"data.train_files=[{root}/train.parquet]", "data.val_files=[]", "data.prompts_per_step=4",
               "data.max_prompt_length=256", "rollout.backend=embedded", "rollout.n=4", "rollout.max_new_tokens=8",
               "actor.micro_batch_tokens=1024", f"reward.function={root}/reward.py:compute_score",
               "reward.num_workers=1", "reward.format_weight=0", "trainer.steps=2", "trainer.warmup_sft_steps=1",
               "trainer.save_every=-1", f"trainer.run_dir={root}/run", "logging.wandb=false",
               "logging.plot_at_end=false", *overrides]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def healthy_grpo_steps(root, result: subprocess.CompletedProcess) -> List[Dict[str, float]]:
    """The run's GRPO-step records after checking it: exit status 0, a finite warm-up loss, steps 1 and 2 with
    finite reward, loss, KL and a non-zero gradient norm, and the engine's log-probs of its samples equal to
    the actor's within LOGPROB_TOLERANCE."""
    assert result.returncode == 0, result.stderr[-4000:]
    with open(root / "run" / "metrics.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert math.isfinite(records[0]["warmup/sft_loss"])
    steps = [record for record in records if record["step"] > 0]
    assert [record["step"] for record in steps] == [1, 2]
    for record in steps:
        for key in ("reward/mean", "loss/policy", "kl/mean", "actor/grad_norm"):
            assert math.isfinite(record[key]), (record["step"], key)
        assert record["actor/grad_norm"] > 0
        assert record["rollout/logprob_abs_diff_max"] < LOGPROB_TOLERANCE
    return steps
