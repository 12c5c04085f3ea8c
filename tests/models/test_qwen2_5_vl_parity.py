"""Qwen2.5-VL on megatron-core scores tokens like transformers' own model, under every parallel layout.

One 4-rank CPU run builds the model at (TP, PP) = (2,2), (2,1), (1,2), (1,1) (data-parallel replicas
fill the rest), loads the same tiny HF checkpoint (untied embeddings, vocabulary padded for TP), and
computes per-token log-probs through megatron-core's pipeline schedule for a batch with two images of
different sizes in one sample, a text-only sample, and a video of 4 temporal patches (8 frames) followed by
an image in one sample (transformers gets it as pixel_values_videos with second_per_grid_ts), packed (THD)
and right-padded."""
import json
import os

import pytest
import torch

from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from tests.cpu_ranks import run_on_cpu_ranks
from tests.models.qwen_inputs import hf_logprobs, make_samples, packed, padded

LAYOUTS = [(2, 2), (2, 1), (1, 2), (1, 1)]
TOLERANCE = 1e-4  # max abs, fp32, the acceptance bar


def _config(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as handle:
        return json.load(handle)


def _pipeline_logprobs(model, inputs, labels, seq_length: int, micro_batch_size: int):
    """[B, S] log-probs of `labels` on the last pipeline stage (None elsewhere), via megatron's schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mmrl_megatron.models.common.logprobs import vocab_parallel_logprobs

    def forward_step(data_iterator, model):
        output = model(*next(data_iterator))

        def loss(logits):
            logprobs = vocab_parallel_logprobs(logits, labels)
            return logprobs.sum() * 0, {"logprobs": logprobs.detach()}

        return output, loss

    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([inputs]), model=[model], num_microbatches=1,
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)
    return stored[0]["logprobs"] if parallel_state.is_pipeline_last_stage() else None


def _next_tokens(ids: torch.Tensor, lengths) -> torch.Tensor:
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    return labels


def _layouts_on_ranks(hf_dir: str, pad_id: int):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.convert import load_hf_into_model
    from mmrl_megatron.models import conversion_table
    from mmrl_megatron.models import build_model
    from mmrl_megatron.parallel import ParallelLayout, init_model_parallel

    config = _config(hf_dir)
    samples = make_samples(config)
    lengths = [len(s.ids) for s in samples]
    results = {}
    for tp, pp in LAYOUTS:
        init_model_parallel(ParallelLayout(tensor=tp, pipeline=pp))
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        model = build_model(ModelConfig(hf_path=hf_dir, dtype="float32", make_vocab_size_divisible_by=1), config,
                            "actor")
        load_hf_into_model(model, hf_dir, conversion_table(model))
        model.eval()
        ids, positions, params, (pixels, grids) = packed(samples)
        packed_lp = _pipeline_logprobs(model, (ids, positions, params, pixels, grids), _next_tokens(ids, lengths),
                                       ids.shape[1], 1)
        pad_ids, pad_positions, (pixels, grids) = padded(samples, pad_id)
        padded_lp = _pipeline_logprobs(model, (pad_ids, pad_positions, None, pixels, grids),
                                       _next_tokens(pad_ids, lengths), pad_ids.shape[1], pad_ids.shape[0])
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
    config = _config(hf_dir)
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

