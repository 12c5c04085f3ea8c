"""HF -> Megatron shards -> HF is bit-exact for Qwen2.5-VL at TP=2 x PP=2 (4 CPU ranks), for tied and
untied embeddings, a vocabulary padded for TP, and GQA with one KV head per TP rank; a checkpoint that
does not fit stops with the offending tensor's name."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from tests.cpu_ranks import run_on_cpu_ranks


def _build(hf_dir: str, divisible_by: int, dims):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.models import build_model

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    with open(os.path.join(hf_dir, "config.json")) as handle:
        config = json.load(handle)
    return build_model(ModelConfig(hf_path=hf_dir, dtype="float32", make_vocab_size_divisible_by=divisible_by),
                       config, dims, "actor")


def _load_error(model, hf_dir: str, dims) -> str:
    from mmrl_megatron.convert import CheckpointError, load_hf_into_model
    from mmrl_megatron.models import conversion_table

    try:
        load_hf_into_model(model, hf_dir, conversion_table(model), dims)
    except CheckpointError as error:
        return str(error)
    return ""


def _corrupt(source: str, out_dir: str, edit) -> str:
    """A copy of `source` whose tensors went through edit(dict)."""
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
    for hf_dir, divisible_by in checkpoints:
        model = _build(hf_dir, divisible_by, dims)
        load_hf_into_model(model, hf_dir, conversion_table(model), dims)
        expected = load_file(os.path.join(hf_dir, "model.safetensors"))
        names, mismatched = [], []
        for name, tensor in iter_hf_tensors(model, dims):
            names.append(name)
            if name not in expected or not torch.equal(expected[name], tensor):
                mismatched.append(name)
        report[hf_dir] = dict(names=names, mismatched=mismatched, missing=sorted(set(expected) - set(names)),
                              vocab_rows=model.language_model.embedding.word_embeddings.weight.shape[0]
                              if model.pre_process else None)
    hf_dir = checkpoints[0][0]
    model = _build(hf_dir, checkpoints[0][1], dims)
    own = os.path.join(scratch, f"rank{dist.get_rank()}")
    report["errors"] = {
        "missing": _load_error(model, _corrupt(hf_dir, own + "_missing",
                                               lambda t: t.pop("model.layers.3.mlp.up_proj.weight")), dims),
        "shape": _load_error(model, _corrupt(hf_dir, own + "_shape", lambda t: t.update(
            {"visual.blocks.0.attn.qkv.bias": torch.zeros(5)})), dims),
        "unknown": _load_error(model, _corrupt(hf_dir, own + "_unknown", lambda t: t.update(
            {"model.layers.9.extra.weight": torch.zeros(2)})), dims),
    }
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_convert")
    # untied, 263-token vocabulary padded to 264 at TP=2; 2 KV heads over TP=2 = 1 KV head per rank
    untied = build_tiny_checkpoint(str(root / "untied"), tie_word_embeddings=False)
    tied = build_tiny_checkpoint(str(root / "tied"), seed=1, tie_word_embeddings=True)
    results = run_on_cpu_ranks(4, _round_trip_on_ranks, [(untied, 1), (tied, 128)], str(root / "scratch"))
    return untied, tied, results


def test_round_trip_is_bit_exact_on_every_rank(reports):
    """Invariant: every HF tensor comes back bit-exact and exactly once, on every rank, under TP=2 x PP=2."""
    untied, tied, results = reports
    for hf_dir in (untied, tied):
        for report in results:
            assert report[hf_dir]["mismatched"] == []
            assert report[hf_dir]["missing"] == []
            assert len(report[hf_dir]["names"]) == len(set(report[hf_dir]["names"]))
    assert "lm_head.weight" in results[0][untied]["names"]
    assert "lm_head.weight" not in results[0][tied]["names"]


def test_export_order_is_the_same_on_every_rank(reports):
    """Invariant: all ranks walk the tensors in one fixed order (the bridge's buckets depend on it)."""
    untied, _, results = reports
    assert all(report[untied]["names"] == results[0][untied]["names"] for report in results)


def test_vocabulary_is_padded_for_tensor_parallelism(reports):
    """Invariant: the embedding holds the vocabulary rounded up to divisible_by x TP rows (here 264 = 2 x 132,
    and 512 for divisible_by 128), and the padding never reaches the exported tensor (checked above)."""
    untied, tied, results = reports
    first_stage = [r for r in results if r[untied]["vocab_rows"] is not None]
    assert {r[untied]["vocab_rows"] for r in first_stage} == {132}
    assert {r[tied]["vocab_rows"] for r in first_stage} == {256}


def test_mismatched_checkpoints_name_the_tensor(reports):
    """Invariant: a missing tensor, a wrong shape or an unknown tensor stops loading with its name."""
    _, _, results = reports
    errors = [report["errors"] for report in results]
    assert any("model.layers.3.mlp.up_proj.weight" in e["missing"] for e in errors)
    assert all("visual.blocks.0.attn.qkv.bias" in e["shape"] for e in errors if e["shape"])
    assert any(e["shape"] for e in errors)
    assert all("model.layers.9.extra.weight" in e["unknown"] for e in errors)
