"""The offline conversions keep the published checkpoint's dtype: a bf16 Qwen2.5-VL checkpoint comes back
from hf_to_mcore -> mcore_to_hf in bf16 for every tensor, bit-exact, and the megatron model holds its RMSNorm
weights in bf16 as the checkpoint does (models/common/norms.py: torch's fused kernel needs one dtype). (Kimi-VL's: tests/convert/test_kimi_vl.py; other layouts and misfits:
tests/tools/test_checkpoint_convert.py.)"""
import os

import torch
from safetensors.torch import load_file

from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from tests.cpu_ranks import run_on_cpu_ranks


def _round_trip(hf_dir: str, mcore_dir: str, back_dir: str):
    """HF -> megatron checkpoint -> HF on one rank; returns the dtypes of the megatron model's norm weights."""
    from mmrl_megatron.models import build_model_from_dir
    from mmrl_megatron.models.checkpoint_conversion import convert_hf_to_mcore, convert_mcore_to_hf
    from mmrl_megatron.parallel import ParallelDims, start_processes

    dims = start_processes(ParallelDims(world_size=1), torch.device("cpu"))
    convert_hf_to_mcore(hf_dir, mcore_dir, dims)
    convert_mcore_to_hf(mcore_dir, back_dir, dims)
    model = build_model_from_dir(mcore_dir, dims)
    return {str(parameter.dtype) for name, parameter in model.named_parameters() if "layernorm" in name}


def test_export_keeps_the_published_dtype(tmp_path):
    """Invariant: every exported tensor has the dtype config.json declares (bf16 here), whatever dtype the
    megatron model keeps it in, and equals the original."""
    hf_dir = build_tiny_checkpoint(str(tmp_path / "hf"), dtype=torch.bfloat16)
    back_dir = str(tmp_path / "back")
    model_norm_dtypes = run_on_cpu_ranks(1, _round_trip, hf_dir, str(tmp_path / "mcore"), back_dir)[0]
    assert model_norm_dtypes == {"torch.bfloat16"}  # megatron's own norms kept fp32 weights (and exported them)
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    exported = load_file(os.path.join(back_dir, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert tensor.dtype == torch.bfloat16, name
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name
