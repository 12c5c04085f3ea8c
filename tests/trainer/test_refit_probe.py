"""The trainer's refit probe: after a sync, an engine that cannot return weights by name (SGLang) is checked by
the log-probs of a fixed probe batch, its greedy decode against the actor's scoring. Real parts on one CPU
rank: the tiny Qwen2.5-VL actor role, the embedded engine filled through the weight bridge."""
from types import SimpleNamespace

import pytest

from tests.cpu_ranks import run_on_cpu_ranks
from tests.rollout.embedded_helpers import make_requests


def _probe_differences(hf_dir: str):
    """(difference after a faithful sync, the error after the engine's final norm is scaled)."""
    import json
    import os

    import torch
    from transformers import AutoConfig

    from mmrl_megatron.bridge import BridgeError, WeightBridge
    from mmrl_megatron.bridge.refit_check import check_refit
    from mmrl_megatron.config import load_config
    from mmrl_megatron.models.common.packing import pack_sequences
    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.rollout import build_engine
    from mmrl_megatron.trainer.build import _unwrapped, build_role, load_model
    from mmrl_megatron.models.family import position_rule
    from mmrl_megatron.trainer.refit_probe import build_refit_probe

    config = load_config(None, [f"model.hf_path={hf_dir}", "model.dtype=float32", "trainer.device=cpu"])
    with open(os.path.join(hf_dir, "config.json")) as handle:
        hf_config = json.load(handle)
    device = torch.device("cpu")
    dims = start_processes(ParallelDims(world_size=1), device)
    actor = build_role("actor", load_model(config, hf_config, "actor", device, dims), config, device, dims,
                       config.actor.optim)
    engine = build_engine(config, hf_dir, device)
    prompts = [SimpleNamespace(prompt_ids=r.prompt_ids, pixel_values=r.pixel_values, image_grid_thw=r.image_grid_thw,
                               images=[], prompt_text="", second_per_grid_ts=[])
               for r in make_requests(AutoConfig.from_pretrained(hf_dir), [[1, 4, 4], None])]
    probe = build_refit_probe(prompts, actor, position_rule(hf_config, config.model.family), pack_sequences, 4096)
    bridge = WeightBridge(_unwrapped(actor.chunks), engine, 1 << 20, dims, probe=probe)
    bridge.sync()
    faithful = check_refit(engine, probe)
    norm = next(name for name, _ in engine.model.named_parameters() if name.endswith("language_model.norm.weight"))
    engine.update_weights(iter([[(norm, dict(engine.model.named_parameters())[norm].detach() * 3.0)]]))
    try:
        check_refit(engine, probe)
        error = None
    except BridgeError as caught:
        error = str(caught)
    return faithful, error


def test_probe_passes_a_faithful_sync_and_catches_other_weights(tmp_path):
    """Invariant: after the bridge's sync the engine's greedy probe log-probs (an image prompt and a text one)
    equal the actor's within 1e-4 (fp32); an engine holding other weights fails the check with a message
    that says so."""
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint

    hf_dir = build_tiny_checkpoint(str(tmp_path / "tiny"))
    [(faithful, error)] = run_on_cpu_ranks(1, _probe_differences, hf_dir)
    assert faithful < 1e-4
    assert error is not None and "holds other weights than the actor" in error
