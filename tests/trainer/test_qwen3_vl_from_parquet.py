"""Qwen3-VL trained from verl parquet by launch/train.py: torchrun on 2 CPU ranks with
yaml_configs/grpo_qwen3vl_8b.yaml, overridden to a tiny Qwen3-VL checkpoint, the embedded engine and TP=2.
Nothing is a stand-in: the family registry finds models/qwen3_vl, whose image processing, positions,
megatron model (DeepStack, interleaved M-RoPE, QK-norm), rule table and engine adapter run as in a real job."""
from tests.trainer.parquet_runs import healthy_grpo_steps, launch_tiny_grpo


def _assets(root) -> None:
    """The tiny checkpoint and 8 synthetic Geometry3K-format rows, one with a corrupt image."""
    from mmrl_megatron.data.format import write_rows
    from mmrl_megatron.data.synthetic import make_rows
    from mmrl_megatron.models.qwen3_vl.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(str(root / "model"), seed=3)
    rows = make_rows(8, seed=0, split="train")
    rows[2]["images"] = [{"bytes": rows[2]["images"][0]["bytes"][:40]}]
    write_rows(str(root / "train.parquet"), rows)


def test_grpo_on_qwen3_vl_from_parquet(tmp_path):
    """Invariant: the Qwen3-VL YAML trains a Qwen3-VL checkpoint from verl parquet on 2 CPU ranks at TP=2: a
    warm-up step and 2 GRPO steps finish with finite reward, loss and gradient norm (the gradient non-zero),
    the engine's log-probs of its samples (image prompts) equal the actor's within 1e-4, and the corrupt image
    is skipped and counted."""
    _assets(tmp_path)
    steps = healthy_grpo_steps(tmp_path, launch_tiny_grpo(
        tmp_path, "yaml_configs/grpo_qwen3vl_8b.yaml", 29587,
        ["parallel.tensor=2", "actor.mini_batches_per_step=1", "actor.optim.use_distributed_optimizer=false",
         "data.max_pixels=12544"]))
    assert steps[-1]["data/skipped_undecodable_image"] >= 1
