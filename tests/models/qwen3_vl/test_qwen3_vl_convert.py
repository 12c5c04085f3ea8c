"""HF -> Megatron shards -> HF is bit-exact for Qwen3-VL at TP=2 x PP=2 (4 CPU ranks) under the published
tensor names (model.language_model.*, model.visual.*, lm_head.*), for tied (2B/4B) and untied (8B/32B)
embeddings, a vocabulary padded for TP, QK-norm, and the DeepStack mergers; a checkpoint that does not fit
stops with the offending tensor's name."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmrl_megatron.models.qwen3_vl.tiny import build_tiny_checkpoint
from tests.cpu_ranks import run_on_cpu_ranks

pytestmark = pytest.mark.slow  # about 60 s on 2 cores: one 4-rank run (spawning and importing dominate)


def _build(hf_dir: str, dims):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.models import build_model

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    with open(os.path.join(hf_dir, "config.json")) as handle:
        config = json.load(handle)
    return build_model(ModelConfig(hf_path=hf_dir, dtype="float32", make_vocab_size_divisible_by=1), config, dims,
                       "actor")


def _load_error(model, hf_dir: str, dims) -> str:
    from mmrl_megatron.convert import CheckpointError, load_hf_into_model
    from mmrl_megatron.models import conversion_table

    try:
        load_hf_into_model(model, hf_dir, conversion_table(model), dims)
    except CheckpointError as error:
        return str(error)
    return ""


def _corrupt(source: str, out_dir: str, edit) -> str:
    """A copy of `source` (weights and config) whose tensors went through edit(dict)."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(source, "config.json")) as src, open(os.path.join(out_dir, "config.json"), "w") as dst:
        dst.write(src.read())
    return out_dir


def _round_trip_on_ranks(checkpoints, scratch: str):
    import torch.distributed as dist

    from mmrl_megatron.convert import iter_hf_tensors, load_hf_into_model
    from mmrl_megatron.models import conversion_table
    from mmrl_megatron.parallel import ParallelDims, start_processes

    dims = start_processes(ParallelDims(dist.get_world_size(), tensor=2, pipeline=2), torch.device("cpu"))
    report = {}
    for hf_dir in checkpoints:
        model = _build(hf_dir, dims)
        load_hf_into_model(model, hf_dir, conversion_table(model), dims)
        expected = load_file(os.path.join(hf_dir, "model.safetensors"))
        names, mismatched = [], []
        for name, tensor in iter_hf_tensors(model, dims):
            names.append(name)
            if name not in expected or not torch.equal(expected[name], tensor):
                mismatched.append(name)
        report[hf_dir] = dict(names=names, mismatched=mismatched, missing=sorted(set(expected) - set(names)))
    model = _build(checkpoints[0], dims)
    own = os.path.join(scratch, f"rank{dist.get_rank()}")
    report["errors"] = {
        "missing": _load_error(model, _corrupt(checkpoints[0], own + "_missing", lambda t: t.pop(
            "model.language_model.layers.3.self_attn.k_norm.weight")), dims),
        "shape": _load_error(model, _corrupt(checkpoints[0], own + "_shape", lambda t: t.update(
            {"model.visual.deepstack_merger_list.1.norm.bias": torch.zeros(5)})), dims),
    }
    return report


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    untied = build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3_vl_untied")))
    tied = build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3_vl_tied")), seed=1, tie_word_embeddings=True)
    reports = run_on_cpu_ranks(4, _round_trip_on_ranks, [untied, tied], str(tmp_path_factory.mktemp("scratch")))
    return (untied, tied), reports


def test_export_gives_back_every_published_tensor_bit_exactly(round_trip):
    """Invariant: load then export at TP=2 x PP=2 returns each HF tensor, by its published name, bit for bit,
    once (a tied lm_head is the embedding, not a second tensor), on every rank."""
    checkpoints, reports = round_trip
    for report in reports:
        for hf_dir in checkpoints:
            result = report[hf_dir]
            assert result["mismatched"] == [] and result["missing"] == [], (hf_dir, result)
            assert len(result["names"]) == len(set(result["names"]))
    untied, tied = (reports[0][hf_dir]["names"] for hf_dir in checkpoints)
    assert "lm_head.weight" in untied and "lm_head.weight" not in tied
    assert any(name.startswith("model.visual.deepstack_merger_list.1.") for name in untied)


def test_a_checkpoint_that_does_not_fit_names_the_tensor(round_trip):
    """Invariant: a missing or misshapen tensor stops loading, on the stage that holds it, with its HF name in
    the message (layer 3 is on the last stage, the DeepStack mergers on the first)."""
    _, reports = round_trip
    missing = [report["errors"]["missing"] for report in reports]
    shape = [report["errors"]["shape"] for report in reports]
    assert any("model.language_model.layers.3.self_attn.k_norm.weight" in message for message in missing), missing
    assert any("model.visual.deepstack_merger_list.1.norm.bias" in message for message in shape), shape
