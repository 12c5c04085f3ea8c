"""Compiled fused kernels keep compiling across many input variants instead of falling back to eager."""
import torch

from mmrl_megatron.models.common.compile_limits import COMPILED_VARIANTS_LIMIT, allow_compiled_variants


def test_more_variants_than_dynamos_default_stay_compiled(monkeypatch):
    """Invariant: with the raised limit a function called with 12 input variants (over dynamo's default of 8)
    is compiled for every one of them (no silent eager fallback), and the limit is never lowered."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    allow_compiled_variants()
    assert torch._dynamo.config.recompile_limit == COMPILED_VARIANTS_LIMIT
    allow_compiled_variants(4)
    assert torch._dynamo.config.recompile_limit == COMPILED_VARIANTS_LIMIT

    compiled_calls = []

    def counting_backend(graph, example_inputs):
        compiled_calls.append(len(example_inputs))
        return graph.forward

    torch._dynamo.reset()

    @torch.compile(backend=counting_backend, dynamic=False)
    def scaled(x, scale: int):
        return x * scale

    for variant in range(12):  # static shapes and a Python constant: one entry per variant
        scaled(torch.ones(variant + 1), variant)
    torch._dynamo.reset()
    assert len(compiled_calls) == 12
