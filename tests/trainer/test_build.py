"""Building a run (trainer/build.py) from a converted megatron checkpoint (model.mcore_checkpoint): the
actor starts with the HF checkpoint's weights without reading HF weights, takes config and tokenizer from
the checkpoint's hf/ files, and its first RL step is the one the HF directory gives."""
import os

import numpy as np
import pytest

from tests.cpu_ranks import run_on_cpu_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2, vision_out_hidden_size=32,
            vision_depth=1)


def _overrides(root: str, name: str):
    return [f"trainer.run_dir={root}/{name}", f"data.train_files=[{root}/train.parquet]", "data.val_files=[]",
            "trainer.prepare_demo_assets=false", "trainer.warmup_sft_steps=0", "trainer.eval_every=0",
            "trainer.save_every=-1", "trainer.steps=1", "data.prompts_per_step=2", "rollout.n=2",
            "rollout.max_new_tokens=4", "logging.wandb=false", "logging.console=false", "logging.plot_at_end=false"]


def _first_step(config):
    """(initial actor weights, first-step metrics without timings) of a run built by build_trainer."""
    import torch

    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.trainer.build import build_trainer, close_trainer

    device = torch.device("cpu")
    trainer = build_trainer(config, start_processes(ParallelDims.from_config(config, 1, None), device), device)
    try:
        weights = {name: p.detach().numpy().copy() for name, p in trainer.parts.actor.chunks[0].named_parameters()}
        trainer.sync_weights()  # what run() does before the first step
        metrics = trainer.train_step(1)
    finally:
        close_trainer(trainer)
    return weights, {key: value for key, value in metrics.items()
                     if not key.startswith(("time/", "throughput/", "weight_sync/"))}


def _from_hf_and_from_converted(root: str):
    import torch

    from mmrl_megatron.config import load_config
    from mmrl_megatron.models.checkpoint_conversion import convert_hf_to_mcore
    from mmrl_megatron.data.format import write_rows
    from mmrl_megatron.data.synthetic import make_rows
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
    from mmrl_megatron.parallel import ParallelDims, start_processes

    hf_dir, mcore_dir = f"{root}/hf_model", f"{root}/mcore_model"
    build_tiny_checkpoint(hf_dir, seed=3, **TINY)
    write_rows(f"{root}/train.parquet", make_rows(8, 0, "train"))
    convert_hf_to_mcore(hf_dir, mcore_dir, start_processes(ParallelDims(world_size=1), torch.device("cpu")))
    demo = os.path.join(ROOT, "yaml_configs", "demo_cpu.yaml")
    from_hf = _first_step(load_config(demo, _overrides(root, "hf") + [f"model.hf_path={hf_dir}"]))
    os.rename(hf_dir, f"{root}/hf_model_moved")  # the second run cannot read the HF directory at all
    from_mcore = _first_step(load_config(demo, _overrides(root, "mcore") + ["model.hf_path=''",
                                                                            f"model.mcore_checkpoint={mcore_dir}"]))
    return from_hf, from_mcore


def test_first_step_from_converted_checkpoint_equals_first_step_from_hf(tmp_path):
    """Invariant: a run started from hf_to_mcore's output (model.mcore_checkpoint, model.hf_path empty, the
    HF directory gone) builds an actor with bit-identical weights and takes the same first RL step (rewards,
    old log-probs through the policy loss, KL, entropy, gradient norm) as a run started from the HF directory."""
    [((hf_weights, hf_metrics), (mcore_weights, mcore_metrics))] = run_on_cpu_ranks(
        1, _from_hf_and_from_converted, str(tmp_path))
    assert hf_weights.keys() == mcore_weights.keys() and hf_weights
    for name, tensor in hf_weights.items():
        assert np.array_equal(tensor, mcore_weights[name]), name
    assert mcore_metrics == hf_metrics and "loss/policy" in hf_metrics


def test_mcore_checkpoint_that_is_not_one_is_refused(tmp_path):
    """Invariant: model.mcore_checkpoint naming a directory without a distributed checkpoint stops the build
    with a ConfigError naming the key and the converter to run."""
    from mmrl_megatron.config import ConfigError, load_config
    from mmrl_megatron.trainer.build import with_model_files

    config = load_config(None, [f"model.mcore_checkpoint={tmp_path}"])
    with pytest.raises(ConfigError, match="model.mcore_checkpoint: .*hf_to_mcore.py"):
        with_model_files(config)
