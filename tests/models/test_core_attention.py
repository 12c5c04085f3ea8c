"""The packed core attention: a constant number of kernels per layer whatever the number of sequences, the
same function as one SDPA per sequence, and no host synchronisation inside a forward or backward.

On the CPU the variable-length kernel does not exist, so the CPU tests put a stand-in with its contract
(cu_seqlens as a device tensor, maxima as ints, causality through window_size or is_causal, GQA through
enable_gqa or repeated heads) in its place: they check how often and with what our module calls it.
The GPU tests run torch's own kernel."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from mmrl_megatron.models.common import core_attention
from mmrl_megatron.models.common.packing import pack_sequences, packed_segments
from tests.cpu_ranks import run_on_cpu_ranks
from tests.models.qwen_inputs import make_samples

REFERENCE_SDPA = F.scaled_dot_product_attention


class StandInVarlen:
    """varlen_attn's contract computed one sequence at a time; counts its calls."""

    def __init__(self, names):
        self.names, self.calls = frozenset(names), 0

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, window_size=None,
                 is_causal=None, enable_gqa=False):
        self.calls += 1
        assert cu_seq_q.dtype == torch.int32 and isinstance(max_q, int) and isinstance(max_k, int)
        assert enable_gqa or key.shape[1] == query.shape[1], "fewer key heads need enable_gqa or repeated heads"
        assert query.shape[-1] == key.shape[-1] == value.shape[-1], "flash kernels take one head width"
        causal = window_size == (-1, 0) if "window_size" in self.names else bool(is_causal)
        bounds = cu_seq_q.tolist()
        assert max_q == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
            pieces.append(REFERENCE_SDPA(q, k, v, is_causal=causal, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
        return torch.cat(pieces)


def _use_stand_in(monkeypatch, names):
    stand_in = StandInVarlen(names)
    monkeypatch.setattr(core_attention, "_varlen_attention", lambda: (stand_in, stand_in.names))
    monkeypatch.setattr(core_attention, "packed_kernel", lambda query, dropout: "varlen")
    return stand_in


def _attention(causal: bool, scale: float = 0.25):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16,
                               attention_dropout=0.0, use_cpu_initialization=True)
    return core_attention.TorchCoreAttention(config, 1, AttnMaskType.causal if causal else AttnMaskType.no_mask,
                                             "self", softmax_scale=scale)


@pytest.mark.parametrize("names", [("window_size", "scale", "enable_gqa"), ("is_causal", "scale")])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_path_equals_one_sdpa_per_sequence(monkeypatch, names, causal):
    """Invariant: the one-kernel path computes what the exact per-sequence path computes, for GQA, causal
    and bidirectional attention, a value width other than the key's (MLA), THD and one-stream (sbhd) input,
    whichever keywords the installed torch's varlen_attn takes."""
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]
    _, _, params = pack_sequences([[0] * n for n in lengths])
    total = sum(lengths)
    query = torch.randn(total, 4, 16, generator=generator)
    key = torch.randn(total, 2, 16, generator=generator)
    value = torch.randn(total, 2, 12, generator=generator)
    module = _attention(causal)
    exact = module(query, key, value, None, packed_seq_params=params)
    stand_in = _use_stand_in(monkeypatch, names)
    assert torch.allclose(module(query, key, value, None, packed_seq_params=params), exact, atol=1e-6)
    stream = module(query[:, None], key[:, None], value[:, None], None, packed_seq_params=params.as_one_stream())
    assert stream.shape == (total, 1, 4 * 12) and torch.allclose(stream[:, 0], exact, atol=1e-6)
    assert stand_in.calls == 2


def _count_kernel_calls(hf_dir: str, sample_counts):
    """Per forward of the tiny Qwen2.5-VL with the stand-in kernel: (varlen calls, SDPA calls) for each count of
    packed samples (each with two images), and the layer counts of the language model and the vision tower."""
    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.convert import load_hf_into_model
    from mmrl_megatron.models import conversion_table
    from mmrl_megatron.models import build_model
    from mmrl_megatron.parallel import ParallelDims, start_processes

    with open(os.path.join(hf_dir, "config.json")) as handle:
        config = json.load(handle)
    dims = start_processes(ParallelDims(world_size=1), torch.device("cpu"))
    model = build_model(ModelConfig(hf_path=hf_dir, dtype="float32"), config, dims, "actor").eval()
    load_hf_into_model(model, hf_dir, conversion_table(model), dims)
    image_sample = make_samples(config)[0]
    monkeypatch = pytest.MonkeyPatch()
    stand_in = _use_stand_in(monkeypatch, ("window_size", "scale", "enable_gqa"))
    sdpa_calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: sdpa_calls.append(1) or REFERENCE_SDPA(*args, **kwargs))
    counts = []
    with torch.no_grad():
        for count in sample_counts:
            ids, _, params = pack_sequences([image_sample.ids.tolist()] * count)
            positions = torch.cat([image_sample.positions] * count, dim=1).unsqueeze(1)
            pixels = torch.cat([image_sample.pixel_values] * count)
            grids = torch.cat([image_sample.grid_thw] * count)
            stand_in.calls, sdpa_calls[:] = 0, []
            model(ids, positions, params, pixel_values=pixels, image_grid_thw=grids)
            counts.append((stand_in.calls, len(sdpa_calls)))
    monkeypatch.undo()
    return counts, config["text_config"]["num_hidden_layers"], config["vision_config"]["depth"]


def test_packed_attention_calls_do_not_grow_with_the_number_of_sequences(tmp_path):
    """Invariant (issue 15, acceptance 5): a forward of the model issues one attention kernel per layer of the
    language model and of the vision tower (whose windows and images are sequences too), for 1 packed sample
    or 6: the varlen kernel, or one batched SDPA where the layer's sequences share a length past
    BATCHED_MIN_LENGTH, never one SDPA per sequence."""
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint

    hf_dir = build_tiny_checkpoint(str(tmp_path / "tiny"))
    [(counts, language_layers, vision_layers)] = run_on_cpu_ranks(1, _count_kernel_calls, hf_dir, [1, 6])
    assert [varlen + sdpa for varlen, sdpa in counts] == [language_layers + vision_layers] * 2


@pytest.mark.parametrize("causal", [True, False])
def test_sequences_of_one_length_run_as_one_batched_sdpa(monkeypatch, causal):
    """Invariant: packed sequences that all have one length (empty ones aside) of at least BATCHED_MIN_LENGTH
    skip the varlen kernel for one batched SDPA with the per-sequence path's result, GQA and MLA's narrower
    values included; shorter ones keep the varlen kernel."""
    generator = torch.Generator().manual_seed(0)
    bounds = [0, 6, 6, 12, 18]
    params = packed_segments(bounds)
    query = torch.randn(18, 4, 16, generator=generator)
    key = torch.randn(18, 2, 16, generator=generator)
    value = torch.randn(18, 2, 12, generator=generator)
    module = _attention(causal)
    exact = module(query, key, value, None, packed_seq_params=params)
    stand_in = _use_stand_in(monkeypatch, ("window_size", "scale", "enable_gqa"))
    assert params.common_length == 6 and packed_segments([0, 6, 11]).common_length is None
    for shortest_batched, varlen_calls in ((6, 0), (7, 1)):
        monkeypatch.setattr(core_attention, "BATCHED_MIN_LENGTH", shortest_batched)
        assert torch.allclose(module(query, key, value, None, packed_seq_params=params), exact, atol=1e-6)
        assert stand_in.calls == varlen_calls


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[700, 1, 2048, 311, 96], [2048, 2048]], ids=["ragged", "one-length"])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_packed_kernels_match_the_exact_path_on_gpu(causal, lengths):
    """Invariant: torch's own kernels (varlen for ragged lengths, the batched SDPA for one length; bf16, GQA,
    MLA's narrower values) give the per-sequence SDPA's output and input gradients within bf16 rounding
    (max abs 2e-2 on unit-scale inputs)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = packed_segments([0] + torch.tensor(lengths).cumsum(0).tolist(), "cuda")
    total = sum(lengths)

    def inputs():
        shapes = [(total, 16, 128), (total, 2, 128), (total, 2, 96)]
        return [torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
                for shape in shapes]

    module = _attention(causal, scale=128 ** -0.5)
    assert core_attention.packed_kernel(inputs()[0], 0.0) == "varlen"
    tensors = inputs()
    results = []
    for kernel in ("varlen", "segments"):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(core_attention, "packed_kernel", lambda query, dropout: kernel)
            out = module(*tensors, None, packed_seq_params=params)
            grads = torch.autograd.grad(out.float().square().sum(), tensors)
            results.append((out, grads))
    (fast, fast_grads), (exact, exact_grads) = results
    assert (fast.float() - exact.float()).abs().max() < 2e-2
    for mine, reference in zip(fast_grads, exact_grads):
        scale = reference.float().abs().max()
        assert ((mine.float() - reference.float()).abs().max() / scale) < 2e-2
