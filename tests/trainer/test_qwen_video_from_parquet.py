"""Qwen2.5-VL trained on videos from verl parquet by launch/train.py: torchrun on 2 CPU ranks with
yaml_configs/grpo_geo3k_qwen25vl_3b.yaml, overridden to a tiny checkpoint, the embedded engine and TP=2 (the
vision tower sharded over the frames). The `videos` column holds frame lists and encoded clips (with an image
beside a video in one row, a corrupt clip in another); nothing is a stand-in: frame sampling, video patches,
<|video_pad|> expansion, M-RoPE positions with second_per_grid_ts, warm-up, rollout, reward, reference,
megatron update and weight sync all run as in a real job."""
import json
import math
import os
import subprocess
import sys

from tests.data.images import png
from tests.data.videos import encoded_clip, frame_arrays, png_frames

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGPROB_TOLERANCE = 1e-4

# a reward that varies with the sampled text, so GRPO groups have non-zero advantages and the policy loss a gradient
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return (sum(map(ord, solution_str)) % 7) / 6.0
'''


def _video(frames=None, clip=None, sample_fps=None) -> dict:
    """One `videos` entry with every field present (parquet needs one struct type for the column)."""
    return {"video": frames, "bytes": clip, "sample_fps": sample_fps}


def _rows():
    from mmrl_megatron.data.format import make_row

    rows = []
    for index in range(6):
        arrays = frame_arrays(4 + 2 * (index % 3), 56, 84, seed=index)
        entry = _video(frames=png_frames(arrays), sample_fps=2.0) if index % 2 else _video(clip=encoded_clip(arrays, 4))
        images = [png(56, 56)] if index == 3 else []
        rows.append(make_row("What moves in the video?", images, str(index), "unit/video", videos=[entry]))
    clip = encoded_clip(frame_arrays(8, 56, 84), 4)
    rows.append(make_row("What moves?", [], "6", "unit/video", videos=[_video(clip=clip[:200])]))
    return rows


def _assets(root) -> None:
    from mmrl_megatron.data.format import write_rows
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(str(root / "model"), seed=3)
    write_rows(str(root / "train.parquet"), _rows())
    (root / "reward.py").write_text(REWARD)


def _launch(root) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29583",
               "launch/train.py", "--config", "yaml_configs/grpo_geo3k_qwen25vl_3b.yaml",
               f"model.hf_path={root}/model", "model.dtype=float32", "model.recompute=none", "parallel.tensor=2",
               f"data.train_files=[{root}/train.parquet]", "data.val_files=[]", "data.prompts_per_step=4",
               "data.max_prompt_length=256", "data.video.min_pixels=3136", "data.video.max_pixels=4704",
               "rollout.backend=embedded", "rollout.n=4", "rollout.max_new_tokens=8", "actor.micro_batch_tokens=1024",
               "actor.mini_batches_per_step=1", "actor.optim.use_distributed_optimizer=false",
               f"reward.function={root}/reward.py:compute_score", "reward.num_workers=1", "reward.format_weight=0",
               "trainer.steps=2", "trainer.warmup_sft_steps=1", "trainer.save_every=-1", f"trainer.run_dir={root}/run",
               "logging.wandb=false", "logging.plot_at_end=false"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def test_grpo_on_qwen2_5_vl_videos_from_parquet(tmp_path):
    """Invariant: the Qwen2.5-VL YAML trains on a parquet `videos` column (frame lists and encoded clips) on 2
    CPU ranks at TP=2: a warm-up step and 2 GRPO steps finish with finite reward, loss and gradient norm (the
    gradient non-zero), the engine's log-probs of its samples (video prompts) equal the actor's within 1e-4,
    and the corrupt clip is skipped and counted."""
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
    assert steps[-1]["data/skipped_undecodable_video"] >= 1
