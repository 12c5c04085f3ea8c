"""GRPO with the zoom tool, trained by launch/train.py on 4 CPU ranks at TP=2 x PP=2 from Geometry3K-format
parquet (tools/data/preprocess_geo3k.py --zoom-tool) with the Geometry3K YAML: multi-turn rollouts by the
embedded engine, crops returned by the zoom environment, the reference's KL, megatron's update and the weight
sync all run as in a real job. The tiny checkpoint is first taught (teacher forcing in transformers) to ask for
a zoom, so the tool is used from the first step."""
import json
import math
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.data.images import png
from tests.tools.test_data_tools import _tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGPROB_TOLERANCE = 1e-4
ZOOM_REQUEST = "<zoom>0.1,0.2,0.6,0.7</zoom>"
# varies with the trajectory's text (tool turns included), so GRPO groups have non-zero advantages
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return (sum(map(ord, solution_str)) % 7) / 6.0
'''


def _geo3k_data(root) -> str:
    hub = root / "hub"
    hub.mkdir()
    rows = [{"images": [{"bytes": png(56 + 28 * (i % 2), 84), "path": None}],
             "problem": f"<image>Find x in triangle {i}.", "answer": str(i)} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), hub / "train-00000-of-00001.parquet")
    _tool("preprocess_geo3k").main([str(hub), "--out-dir", str(root / "geo3k_zoom"), "--zoom-tool"])
    return str(root / "geo3k_zoom" / "train.parquet")


def _teach_to_zoom(model_dir: str, train_file: str, steps: int = 200) -> None:
    """Teacher-force the checkpoint's answer to every training prompt to be ZOOM_REQUEST + <|im_end|>."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mmrl_megatron.config.schema import DataConfig
    from mmrl_megatron.data import PromptDataset

    dataset = PromptDataset([train_file], DataConfig(max_prompt_length=1024, max_pixels=112 * 112), model_dir,
                            batch_size=8, train=False)
    prompts = next(iter(dataset))
    target = dataset.processor.tokenizer.encode(ZOOM_REQUEST, add_special_tokens=False) + [
        dataset.processor.end_of_turn_token_id]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(steps):
        prompt = prompts[step % len(prompts)]
        ids = torch.tensor([prompt.prompt_ids + target])
        labels = torch.tensor([[-100] * len(prompt.prompt_ids) + target])
        image_tokens = (ids == model.config.image_token_id).int()
        loss = model(input_ids=ids, labels=labels, pixel_values=prompt.pixel_values,
                     image_grid_thw=prompt.image_grid_thw, mm_token_type_ids=image_tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(model_dir)


def _launch(root, train_file: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "29593",
               "launch/train.py", "--config", "yaml_configs/grpo_geo3k_qwen25vl_3b.yaml",
               f"model.hf_path={root}/model", "model.dtype=float32", "model.recompute=none", "parallel.tensor=2",
               "parallel.pipeline=2", f"data.train_files=[{train_file}]", "data.val_files=[]",
               "data.prompts_per_step=4", "data.max_prompt_length=1024", "data.max_pixels=12544",
               "rollout.backend=embedded", "rollout.n=4", "rollout.max_new_tokens=48",
               "rollout.multi_turn.environment=zoom", "rollout.multi_turn.max_turns=2",
               "rollout.multi_turn.max_total_tokens=1400", "actor.micro_batch_tokens=4096",
               "actor.mini_batches_per_step=1", "actor.optim.lr=1e-4",
               f"reward.function={root}/reward.py:compute_score",
               "reward.num_workers=1", "reward.format_weight=0", "trainer.steps=3", "trainer.save_every=-1",
               f"trainer.run_dir={root}/run", "logging.wandb=false", "logging.plot_at_end=false"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_grpo_with_the_zoom_tool_three_steps_tp2_pp2(tmp_path):
    """Invariant (issue 20): GRPO with rollout.multi_turn.environment=zoom runs 3 steps at TP=2 x PP=2 on
    Geometry3K-format data: conversations take a second turn after the tool's crop (more than one assistant
    turn on average, tool tokens in the responses), losses and gradient norms are finite with a non-zero
    gradient, and the engine's log-probs of the generated tokens equal the actor's within 1e-4."""
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(str(tmp_path / "model"), seed=1)
    train_file = _geo3k_data(tmp_path)
    _teach_to_zoom(str(tmp_path / "model"), train_file)
    (tmp_path / "reward.py").write_text(REWARD)
    result = _launch(tmp_path, train_file)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        steps = [record for record in map(json.loads, handle) if record["step"] > 0]
    assert [record["step"] for record in steps] == [1, 2, 3]
    for record in steps:
        for key in ("reward/mean", "loss/policy", "kl/mean", "actor/grad_norm", "actor/entropy"):
            assert math.isfinite(record[key]), (record["step"], key)
        assert record["actor/grad_norm"] > 0
        assert record["rollout/assistant_turns_mean"] > 1 and record["rollout/environment_tokens_mean"] > 0
        assert record["rollout/logprob_abs_diff_max"] < LOGPROB_TOLERANCE
