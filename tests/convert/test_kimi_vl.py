"""Kimi-VL on megatron-core: HF -> megatron -> HF is bit-exact, and the language model's log-probs equal
transformers' DeepseekV3ForCausalLM on the same weights, at EP=2, TP=2 (expert TP 1 and 2), PP=2 and
TP=2 with EP=2, for text and for a prompt with an image (MoonViT features placed at the media
placeholders); all layouts run in one 2-rank spawn."""
import os

import pytest
import torch

from mmrl_megatron.models.kimi_vl.tiny import MEDIA_PLACEHOLDER_TOKEN_ID as MEDIA
from tests.cpu_ranks import run_on_cpu_ranks

# (tensor, pipeline, expert, expert_tensor)
LAYOUTS = [(1, 1, 2, 1), (2, 1, 1, 1), (2, 1, 1, 2), (1, 2, 1, 1), (2, 1, 2, 1)]
# two packed sequences; an odd total, which the model pads for sequence parallelism (TP > 1) to split it
TEXT = [[5, 17, 99, 3, 42, 8, 200], [7, 7, 120, 64, 33, 249, 11, 90]]
IMAGE_GRID = (4, 6)  # patches; 2x2 merging gives 6 image tokens
WITH_IMAGE = [[5, 17, MEDIA, MEDIA, MEDIA, MEDIA, MEDIA, MEDIA, 99, 3], [7, 120, 64, 33, 11, 90]]
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from mmrl_megatron.models.kimi_vl.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("kimi_vl_tiny")), seed=3)


def _pixel_values():
    rows, cols = IMAGE_GRID
    return torch.randn(rows * cols, 3, 14, 14, generator=torch.Generator().manual_seed(4))


def _packed_inputs(sequences):
    from megatron.core.packed_seq_params import PackedSeqParams

    ids = torch.tensor([token for sequence in sequences for token in sequence]).unsqueeze(0)
    bounds = torch.tensor([0] + list(torch.tensor([len(s) for s in sequences]).cumsum(0)), dtype=torch.int32)
    longest = max(len(s) for s in sequences)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, max_seqlen_q=longest,
                             max_seqlen_kv=longest)
    return ids, params


def _next_token_logprobs(full_logits: torch.Tensor, sequences) -> torch.Tensor:
    """Per sequence, log p(token t+1 | <= t) for every position but the last, concatenated."""
    out, start = [], 0
    for sequence in sequences:
        logits = full_logits[start:start + len(sequence) - 1]
        labels = torch.tensor(sequence[1:])
        out.append(torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None]).squeeze(-1))
        start += len(sequence)
    return torch.cat(out)


def _megatron_logprobs(model, sequences, images: bool):
    """Forward through megatron's pipeline schedule; full-vocabulary logits gathered over TP on the last stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids, packed = _packed_inputs(sequences)
    vision = dict(pixel_values=_pixel_values(), image_grid_thw=torch.tensor([[1, *IMAGE_GRID]])) if images else {}
    collected = []

    def forward_step(data_iterator, model_chunk):
        logits = model_chunk(next(data_iterator), packed_seq_params=packed, **vision)

        def keep(output):
            shards = [torch.empty_like(output) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
            dist.all_gather(shards, output.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            collected.append(torch.cat(shards, dim=-1)[0])
            return output.sum() * 0, {}

        return logits, keep

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids]), model=[model],
                                    num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=1,
                                    forward_only=True)
    return _next_token_logprobs(collected[0], sequences) if collected else None


def _run_layouts(hf_dir):
    """Per layout: names that failed the round trip, and the text and image log-probs (from one last-stage rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mmrl_megatron.convert.hf_checkpoint import HFCheckpoint
    from mmrl_megatron.convert import iter_hf_tensors, load_hf_into_model
    from mmrl_megatron.models.hf_config import read_hf_config
    from mmrl_megatron.models.kimi_vl import FAMILY
    from mmrl_megatron.models.kimi_vl.hf_config import kimi_vl_config_from_dict
    from mmrl_megatron.models.kimi_vl.build import build_kimi_vl_model
    from mmrl_megatron.parallel import ParallelDims, start_processes

    kimi, reader = kimi_vl_config_from_dict(read_hf_config(hf_dir)), HFCheckpoint(hf_dir)
    results = {}
    for tp, pp, ep, etp in LAYOUTS:
        layout = ParallelDims(dist.get_world_size(), tensor=tp, pipeline=pp, expert=ep, expert_tensor=etp)
        dims = start_processes(layout, torch.device("cpu"))
        model_parallel_cuda_manual_seed(0)
        model = build_kimi_vl_model(kimi, dims)
        table = FAMILY.rule_table(kimi)
        load_hf_into_model(model, hf_dir, table, dims)
        exported = dict(iter_hf_tensors(model, dims, table))
        wrong = sorted(set(exported) ^ reader.names())
        wrong += [name for name in sorted(reader.names()) if name in exported and not torch.equal(exported[name],
                                                                                          reader.get(name))]
        logprobs = (_megatron_logprobs(model, TEXT, images=False), _megatron_logprobs(model, WITH_IMAGE, images=True))
        reporter = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_last_stage()
        results[(tp, pp, ep, etp)] = (wrong, logprobs if reporter else None)
    return results


def _transformers_logprobs(hf_dir):
    """The oracle: transformers' DeepseekV3ForCausalLM reading the checkpoint's language_model.* tensors;
    image features from our MoonViT + projector (checked against transformers' K2.5 vision model in
    tests/models/kimi_vl/test_vision.py) replace the placeholder embeddings."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM

    from mmrl_megatron.models.hf_config import read_hf_config
    from mmrl_megatron.models.kimi_vl.hf_config import kimi_vl_config_from_dict

    language_dir = os.path.join(hf_dir, "language_only")
    os.makedirs(language_dir, exist_ok=True)
    prefix = "language_model."
    state = {name[len(prefix):]: tensor for name, tensor in load_file(os.path.join(hf_dir, "model.safetensors")).items()
             if name.startswith(prefix)}
    save_file(state, os.path.join(language_dir, "model.safetensors"), metadata={"format": "pt"})
    kimi_vl_config_from_dict(read_hf_config(hf_dir)).text.save_pretrained(language_dir)
    model = DeepseekV3ForCausalLM.from_pretrained(language_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        text_logits = torch.cat([model(torch.tensor([sequence])).logits[0] for sequence in TEXT])
        features = _image_features(hf_dir, model.config.hidden_size)
        image_logits = []
        for sequence in WITH_IMAGE:
            ids = torch.tensor([sequence])
            embeddings = model.get_input_embeddings()(ids)
            if MEDIA in sequence:
                embeddings = embeddings.masked_scatter((ids == MEDIA).unsqueeze(-1), features)
            image_logits.append(model(inputs_embeds=embeddings).logits[0])
    return _next_token_logprobs(text_logits, TEXT), _next_token_logprobs(torch.cat(image_logits), WITH_IMAGE)


def _image_features(hf_dir, text_hidden):
    from safetensors.torch import load_file

    from mmrl_megatron.models.hf_config import read_hf_config
    from mmrl_megatron.models.kimi_vl.hf_config import kimi_vl_config_from_dict
    from mmrl_megatron.models.kimi_vl.vision import MoonViT, MultiModalProjector

    vision = kimi_vl_config_from_dict(read_hf_config(hf_dir)).vision
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    tower, projector = MoonViT(vision), MultiModalProjector(vision, text_hidden)
    for prefix, module in (("vision_tower.", tower), ("multi_modal_projector.", projector)):
        module.load_state_dict({name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)})
    return projector(tower(_pixel_values(), torch.tensor([IMAGE_GRID])))


def test_round_trip_and_logprob_parity_on_every_layout(tiny_dir):
    """Invariants: (1) loading the published checkpoint and exporting it again gives every tensor back
    bit for bit under its own name, whatever the TP/PP/EP/expert-TP layout; (2) the megatron language model's
    next-token log-probs equal transformers' DeepseekV3ForCausalLM within 1e-4 on each layout, with and
    without an image in the prompt."""
    expected = _transformers_logprobs(tiny_dir)
    per_rank = run_on_cpu_ranks(2, _run_layouts, tiny_dir)
    for layout in LAYOUTS:
        for wrong, _ in (rank[layout] for rank in per_rank):
            assert wrong == [], (layout, wrong[:5])
        reported = [logprobs for _, logprobs in (rank[layout] for rank in per_rank) if logprobs is not None]
        assert reported, layout
        for logprobs in reported:
            for case, ours, oracle in zip(("text", "image"), logprobs, expected):
                difference = (ours - oracle).abs().max().item()
                assert difference < LOGPROB_TOLERANCE, (layout, case, difference)


def _streamed_round_trips(conversions, misfit_dir: str, scratch: str):
    """Per (HF dir, megatron dir, HF dir back): HF -> megatron checkpoint -> HF with the streamed converters
    at TP=2, in 32 KiB chunks; then the CheckpointError message of converting misfit_dir ('' if none)."""
    import torch.distributed as dist

    from mmrl_megatron.models.checkpoint_conversion import convert_hf_to_mcore, convert_mcore_to_hf
    from mmrl_megatron.convert.errors import CheckpointError
    from mmrl_megatron.parallel import ParallelDims, start_processes

    dims = start_processes(ParallelDims(dist.get_world_size(), tensor=2), torch.device("cpu"))
    written = []
    for hf_dir, mcore_dir, back_dir in conversions:
        convert_hf_to_mcore(hf_dir, mcore_dir, dims, max_chunk_bytes=32 * 1024)
        written.append(convert_mcore_to_hf(mcore_dir, back_dir, dims, max_chunk_bytes=32 * 1024))
    try:
        convert_hf_to_mcore(misfit_dir, scratch, dims)
    except CheckpointError as error:
        return written, str(error)
    return written, ""


def _with_tensors(source: str, out_dir: str, extra) -> str:
    """A copy of the checkpoint `source` with the tensors `extra` added."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out_dir)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    save_file(dict(tensors, **extra), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir


UNKNOWN_TENSOR = "language_model.model.layers.1.mlp.gate.unknown_scale"


def test_checkpoint_directories_round_trip_bit_exact(tiny_dir, tmp_path):
    """Invariants: the published Kimi-VL tensors (experts, routing bias, MLA and MoonViT weights) survive
    hf_to_mcore -> mcore_to_hf at TP=2 with torch.equal under their names and in their dtype, streamed in
    chunks far smaller than the model: fp32, and bf16 (published checkpoints' dtype, which the export keeps
    for the RMSNorm weights and e_score_correction_bias the model holds in fp32) with rotary inv_freq buffers
    beside the weights, which the model derives from config.json; a checkpoint tensor no rule converts stops
    the conversion with its name."""
    from safetensors.torch import load_file

    from mmrl_megatron.models.kimi_vl.tiny import build_tiny_checkpoint

    bf16_dir = build_tiny_checkpoint(str(tmp_path / "bf16"), seed=3, dtype=torch.bfloat16)
    inv_freq = {f"language_model.model.layers.{layer}.self_attn.rotary_emb.inv_freq": torch.rand(4)
                for layer in range(2)}
    with_buffers = _with_tensors(bf16_dir, str(tmp_path / "bf16_inv_freq"), inv_freq)
    misfit = _with_tensors(tiny_dir, str(tmp_path / "unknown"), {UNKNOWN_TENSOR: torch.ones(3)})
    conversions = [(source, str(tmp_path / f"mcore{index}"), str(tmp_path / f"back{index}"))
                   for index, source in enumerate((tiny_dir, with_buffers))]
    written, error = run_on_cpu_ranks(2, _streamed_round_trips, conversions, misfit, str(tmp_path / "misfit"))[0]
    for (_, _, back_dir), names, source, dtype in zip(conversions, written, (tiny_dir, bf16_dir),
                                                       (torch.float32, torch.bfloat16)):
        original = load_file(os.path.join(source, "model.safetensors"))
        exported = load_file(os.path.join(back_dir, "model.safetensors"))
        assert sorted(names) == sorted(exported) == sorted(original)
        for name, tensor in original.items():
            assert tensor.dtype == dtype, name
            assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert UNKNOWN_TENSOR in error and "no rule converts" in error, error
