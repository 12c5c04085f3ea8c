"""Kimi-VL trained from verl parquet by launch/train.py: torchrun on 2 CPU ranks with
yaml_configs/grpo_kimivl_a3b_geo3k.yaml, overridden to a tiny Kimi-VL checkpoint, the embedded engine and
EP=2 (each rank holds half the experts and its own prompts). Nothing is a stand-in: the data path (Kimi
image processing and <|media_pad|> expansion), supervised warm-up, rollout, reward, reference, megatron
update and weight sync all run as in a real job."""
from tests.trainer.parquet_runs import healthy_grpo_steps, launch_tiny_grpo


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


def test_grpo_on_kimi_vl_from_parquet(tmp_path):
    """Invariant: the Kimi-VL YAML trains a Kimi-VL checkpoint from verl parquet on 2 CPU ranks at EP=2: a
    warm-up step and 2 GRPO steps finish with finite reward, loss and gradient norm (the gradient non-zero),
    the engine's log-probs of its samples (prompts with processed images) equal the actor's within 1e-4, and
    the data counters report the corrupt image (skipped), the over-long prompt (truncated) and the epoch."""
    _assets(tmp_path)
    steps = healthy_grpo_steps(tmp_path, launch_tiny_grpo(
        tmp_path, "yaml_configs/grpo_kimivl_a3b_geo3k.yaml", 29581,
        ["parallel.expert=2", "data.overlong_prompt=truncate"]))
    counters = steps[-1]
    assert counters["data/skipped_undecodable_image"] >= 1 and counters["data/skipped_total"] >= 1
    assert counters["data/truncated"] >= 1
    assert counters["data/epoch"] >= 1  # 12 prompts (the warm-up's included) from 7 usable rows
