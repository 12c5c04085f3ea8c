"""Qwen2.5-VL trained on videos from verl parquet by launch/train.py: torchrun on 2 CPU ranks with
yaml_configs/grpo_geo3k_qwen25vl_3b.yaml, overridden to a tiny checkpoint, the embedded engine and TP=2 (the
vision tower sharded over the frames). The `videos` column holds frame lists and encoded clips (with an image
beside a video in one row, a corrupt clip in another); nothing is a stand-in: frame sampling, video patches,
<|video_pad|> expansion, M-RoPE positions with second_per_grid_ts, warm-up, rollout, reward, reference,
megatron update and weight sync all run as in a real job."""
from tests.data.images import png
from tests.data.videos import encoded_clip, frame_arrays, png_frames
from tests.trainer.parquet_runs import healthy_grpo_steps, launch_tiny_grpo


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


def test_grpo_on_qwen2_5_vl_videos_from_parquet(tmp_path):
    """Invariant: the Qwen2.5-VL YAML trains on a parquet `videos` column (frame lists and encoded clips) on 2
    CPU ranks at TP=2: a warm-up step and 2 GRPO steps finish with finite reward, loss and gradient norm (the
    gradient non-zero), the engine's log-probs of its samples (video prompts) equal the actor's within 1e-4,
    and the corrupt clip is skipped and counted."""
    _assets(tmp_path)
    steps = healthy_grpo_steps(tmp_path, launch_tiny_grpo(
        tmp_path, "yaml_configs/grpo_geo3k_qwen25vl_3b.yaml", 29583,
        ["parallel.tensor=2", "data.video.min_pixels=3136", "data.video.max_pixels=4704",
         "actor.mini_batches_per_step=1", "actor.optim.use_distributed_optimizer=false"]))
    assert steps[-1]["data/skipped_undecodable_video"] >= 1
