"""Qwen2.5-VL on megatron-core scores tokens like transformers' own model, under every parallel layout.

One 4-rank CPU run builds the model at (TP, PP) = (2,2), (2,1), (1,2), (1,1) (data-parallel replicas
fill the rest), loads the same tiny HF checkpoint (untied embeddings, vocabulary padded for TP), and
computes per-token log-probs through megatron-core's pipeline schedule for a batch with two images of
different sizes in one sample, a text-only sample, and a video of 4 temporal patches (8 frames) followed by
an image in one sample (transformers gets it as pixel_values_videos with second_per_grid_ts), packed (THD)
and right-padded."""
import pytest
import torch

from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from tests.cpu_ranks import run_on_cpu_ranks
from tests.models.pipeline_scoring import hf_config_of, next_tokens, pipeline_logprobs
from tests.models.qwen_inputs import hf_logprobs, make_samples, packed, padded

LAYOUTS = [(2, 2), (2, 1), (1, 2), (1, 1)]
TOLERANCE = 1e-4  # max abs, fp32, the acceptance bar


def _layouts_on_ranks(hf_dir: str, pad_id: int):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.convert import load_hf_into_model
    from mmrl_megatron.models import build_model, conversion_table
    from mmrl_megatron.parallel import ParallelDims, detect_process_place, start_processes

    config = hf_config_of(hf_dir)
    samples = make_samples(config)
    lengths = [len(s.ids) for s in samples]
    results = {}
    for tp, pp in LAYOUTS:
        dims = start_processes(ParallelDims(detect_process_place().world_size, tensor=tp, pipeline=pp),
                               torch.device("cpu"))
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        model = build_model(ModelConfig(hf_path=hf_dir, dtype="float32", make_vocab_size_divisible_by=1), config,
                            dims, "actor")
        load_hf_into_model(model, hf_dir, conversion_table(model), dims)
        model.eval()
        ids, positions, params, (pixels, grids) = packed(samples)
        packed_lp = pipeline_logprobs(model, dims, (ids, positions, params, pixels, grids), next_tokens(ids),
                                      ids.shape[1], 1)
        pad_ids, pad_positions, (pixels, grids) = padded(samples, pad_id)
        padded_lp = pipeline_logprobs(model, dims, (pad_ids, pad_positions, None, pixels, grids),
                                      next_tokens(pad_ids), pad_ids.shape[1], pad_ids.shape[0])
        if packed_lp is None:
            continue
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        results[(tp, pp)] = dict(
            packed=[packed_lp[0, s:s + n - 1] for s, n in zip(starts, lengths)],
            padded=[padded_lp[b, :n - 1] for b, n in enumerate(lengths)])
    return results


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    hf_dir = build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen_parity")), tie_word_embeddings=False)
    config = hf_config_of(hf_dir)
    reference = hf_logprobs(hf_dir, make_samples(config))
    per_rank = run_on_cpu_ranks(4, _layouts_on_ranks, hf_dir, config["pad_token_id"])
    return reference, per_rank


def test_logprobs_match_transformers_under_every_layout(parity):
    """Invariant: TP and PP change how the work is split, never the log-probs (1e-4 of HF in fp32), for images
    and for a video's temporal patches alike."""
    reference, per_rank = parity
    seen = set()
    for results in per_rank:
        for layout, result in results.items():
            seen.add(layout)
            for mine, expected in zip(result["packed"], reference):
                assert (mine - expected).abs().max() < TOLERANCE, (layout, (mine - expected).abs().max())
    assert seen == set(LAYOUTS)


def test_packed_and_padded_inputs_give_the_same_logprobs(parity):
    """Invariant: packing sequences (THD, no padding) gives the numbers a padded batch gives."""
    _, per_rank = parity
    for results in per_rank:
        for layout, result in results.items():
            for packed_lp, padded_lp in zip(result["packed"], result["padded"]):
                assert (packed_lp - padded_lp).abs().max() < 1e-5, layout

