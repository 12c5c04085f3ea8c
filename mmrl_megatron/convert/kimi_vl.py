"""Kimi-VL: the rule table between megatron-core names and the published checkpoint names, and the
loader/exporter that apply it on any TP x PP x EP (x expert-TP) layout.

Megatron names are this project's KimiVLModel's: `language_model.` + megatron-core GPTModel names (local
layer spec, MLA, MoE with SequentialMLP or TE's grouped experts), and `vision_tower.*` /
`multi_modal_projector.*`, which equal the checkpoint's. Rules are written with the global layer index
{L} and global expert id {E}; per rank, L = layer_number - 1 and E = ep_rank * experts_per_rank + local
id (mbridge, Megatron-Bridge and slime do the same). MLA tensors are copied as they are (megatron's MLA
applies DeepSeek's interleaved rope itself). Tensor-parallel splits follow each parameter's own
`partition_dim`; gated fc1 weights split gate and up separately, so rank i holds [gate_i; up_i].
"""
import json
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from .errors import CheckpointError

HF_LM = "language_model.model.layers.{L}."
# (megatron pattern with {L}/{E}, HF name(s)); two HF names mean a gated [gate; up] concatenation
RULES: List[Tuple[str, Tuple[str, ...]]] = [
    ("language_model.embedding.word_embeddings.weight", ("language_model.model.embed_tokens.weight",)),
    ("language_model.decoder.final_layernorm.weight", ("language_model.model.norm.weight",)),
    ("language_model.output_layer.weight", ("language_model.lm_head.weight",)),
    ("language_model.decoder.layers.{L}.input_layernorm.weight", (HF_LM + "input_layernorm.weight",)),
    ("language_model.decoder.layers.{L}.pre_mlp_layernorm.weight", (HF_LM + "post_attention_layernorm.weight",)),
    ("language_model.decoder.layers.{L}.self_attention.linear_q_proj.weight", (HF_LM + "self_attn.q_proj.weight",)),
    ("language_model.decoder.layers.{L}.self_attention.linear_q_down_proj.weight", (HF_LM + "self_attn.q_a_proj.weight",)),
    ("language_model.decoder.layers.{L}.self_attention.q_layernorm.weight", (HF_LM + "self_attn.q_a_layernorm.weight",)),
    ("language_model.decoder.layers.{L}.self_attention.linear_q_up_proj.weight", (HF_LM + "self_attn.q_b_proj.weight",)),
    ("language_model.decoder.layers.{L}.self_attention.linear_kv_down_proj.weight",
     (HF_LM + "self_attn.kv_a_proj_with_mqa.weight",)),
    ("language_model.decoder.layers.{L}.self_attention.kv_layernorm.weight", (HF_LM + "self_attn.kv_a_layernorm.weight",)),
    ("language_model.decoder.layers.{L}.self_attention.linear_kv_up_proj.weight", (HF_LM + "self_attn.kv_b_proj.weight",)),
    ("language_model.decoder.layers.{L}.self_attention.linear_proj.weight", (HF_LM + "self_attn.o_proj.weight",)),
    ("language_model.decoder.layers.{L}.mlp.linear_fc1.weight", (HF_LM + "mlp.gate_proj.weight", HF_LM + "mlp.up_proj.weight")),
    ("language_model.decoder.layers.{L}.mlp.linear_fc2.weight", (HF_LM + "mlp.down_proj.weight",)),
    ("language_model.decoder.layers.{L}.mlp.router.weight", (HF_LM + "mlp.gate.weight",)),
    ("language_model.decoder.layers.{L}.mlp.router.expert_bias", (HF_LM + "mlp.gate.e_score_correction_bias",)),
    ("language_model.decoder.layers.{L}.mlp.shared_experts.linear_fc1.weight",
     (HF_LM + "mlp.shared_experts.gate_proj.weight", HF_LM + "mlp.shared_experts.up_proj.weight")),
    ("language_model.decoder.layers.{L}.mlp.shared_experts.linear_fc2.weight", (HF_LM + "mlp.shared_experts.down_proj.weight",)),
    # SequentialMLP (local spec) and TEGroupedMLP (grouped GEMM) name the same expert weights differently
    ("language_model.decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight",
     (HF_LM + "mlp.experts.{E}.gate_proj.weight", HF_LM + "mlp.experts.{E}.up_proj.weight")),
    ("language_model.decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight",
     (HF_LM + "mlp.experts.{E}.down_proj.weight",)),
    ("language_model.decoder.layers.{L}.mlp.experts.linear_fc1.weight{E}",
     (HF_LM + "mlp.experts.{E}.gate_proj.weight", HF_LM + "mlp.experts.{E}.up_proj.weight")),
    ("language_model.decoder.layers.{L}.mlp.experts.linear_fc2.weight{E}", (HF_LM + "mlp.experts.{E}.down_proj.weight",)),
    # replicated vision tower and projector: the same names on both sides
    ("vision_tower.{P}", ("vision_tower.{P}",)),
    ("multi_modal_projector.{P}", ("multi_modal_projector.{P}",)),
]
# TEGroupedMLP's fc2 reports partition_dim 0 but is split on the input dimension (slime, mbridge)
_ROW_PARALLEL_OVERRIDE = re.compile(r"mlp\.experts\.linear_fc2\.weight\d+$")


def _compile(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile("^" + escaped.replace(r"\{P\}", r"(?P<P>.+)") + "$")


_COMPILED = [(_compile(megatron), hf) for megatron, hf in RULES]


def hf_names_for(global_name: str) -> Tuple[str, ...]:
    """HF checkpoint name(s) of a megatron parameter under its global layer/expert numbering."""
    for pattern, hf_names in _COMPILED:
        match = pattern.match(global_name)
        if match:
            return tuple(name.format(**match.groupdict()) for name in hf_names)
    raise CheckpointError(f"no Kimi-VL rule for megatron tensor {global_name!r}: add it to convert/kimi_vl.RULES")


# -- this rank's tensors under global names --------------------------------------------------------

class _Entry:
    """One local megatron tensor with what is needed to shard or gather it."""

    def __init__(self, tensor: torch.Tensor, global_name: str, is_expert: bool, tied_output: bool):
        self.tensor = tensor
        self.global_name = global_name
        self.is_expert = is_expert
        self.gated = global_name.endswith("linear_fc1.weight") or bool(re.search(r"linear_fc1\.weight\d+$", global_name))
        self.partition_dim = None
        if getattr(tensor, "tensor_model_parallel", False):
            self.partition_dim = 1 if _ROW_PARALLEL_OVERRIDE.search(global_name) else tensor.partition_dim
        # with tied embeddings the last stage's output layer is the embedding's copy: load it, never export it
        self.hf_names = ("language_model.model.embed_tokens.weight",) if tied_output else hf_names_for(global_name)
        self.exported = not tied_output


def _layer_numbers(model) -> Dict[int, int]:
    """local layer index -> global index (megatron's layer_number is global and 1-based)."""
    decoder = getattr(model.language_model, "decoder", None)
    return {} if decoder is None else {index: layer.layer_number - 1 for index, layer in enumerate(decoder.layers)}


def _global_name(name: str, layers: Dict[int, int], expert_offset: int) -> str:
    name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{layers[int(m.group(1))]}.", name)
    name = re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{int(m.group(1)) + expert_offset}.", name)
    return re.sub(r"(linear_fc[12]\.weight)(\d+)$", lambda m: f"{m.group(1)}{int(m.group(2)) + expert_offset}", name)


def local_entries(model) -> List[_Entry]:
    """Every parameter and persistent routing buffer of this rank, in a fixed order."""
    from megatron.core import parallel_state

    layers = _layer_numbers(model)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    num_experts = model.language_model.config.num_moe_experts or 0
    expert_offset = ep_rank * (num_experts // parallel_state.get_expert_model_parallel_world_size())
    tied = model.language_model.share_embeddings_and_output_weights
    tensors = list(model.named_parameters()) + [(name, buffer) for name, buffer in model.named_buffers()
                                                 if name.endswith("router.expert_bias")]
    entries = []
    for name, tensor in tensors:
        # (on a single stage a tied output layer has no weight of its own, so it is not listed here)
        entries.append(_Entry(tensor, _global_name(name, layers, expert_offset), ".mlp.experts." in name,
                              tied_output=tied and name.endswith("output_layer.weight")))
    return entries


def _tp_group(entry: _Entry):
    from megatron.core import parallel_state

    if entry.is_expert:
        return (parallel_state.get_expert_tensor_parallel_group(), parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return (parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


# -- HF -> megatron -----------------------------------------------------------------------------------

class SafetensorsReader:
    """Reads single tensors by name from an HF directory (one file or an index of shards)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index_path = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as handle:
                files = json.load(handle)["weight_map"]
        else:
            single = os.path.join(hf_dir, "model.safetensors")
            if not os.path.isfile(single):
                raise CheckpointError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json")
            with safe_open(single, "pt") as handle:
                files = {name: "model.safetensors" for name in handle.keys()}
        self._files = {name: os.path.join(hf_dir, file) for name, file in files.items()}
        self._open = {}

    def names(self) -> List[str]:
        return sorted(self._files)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint; is it a Kimi-VL checkpoint "
                                  "with the published names?")
        path = self._files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path].get_tensor(name)


def _shard(full: torch.Tensor, entry: _Entry, parts: int) -> torch.Tensor:
    """This rank's slice of a full tensor (gated weights: [gate_i; up_i])."""
    if entry.partition_dim is None:
        return full
    _, rank, size = _tp_group(entry)
    if size == 1:
        return full
    if entry.gated:
        return torch.cat([part.chunk(size, dim=entry.partition_dim)[rank]
                          for part in full.chunk(parts, dim=0)], dim=0)
    return full.chunk(size, dim=entry.partition_dim)[rank]


def load_kimi_vl_into_model(model, hf_dir: str) -> int:
    """Fill this rank's shards of a KimiVLModel from the published checkpoint; returns tensors read."""
    reader = SafetensorsReader(hf_dir)
    read = 0
    for entry in local_entries(model):
        pieces = [reader.get(name) for name in entry.hf_names]
        read += len(pieces)
        full = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
        local = _shard(full, entry, len(pieces))
        if tuple(local.shape) != tuple(entry.tensor.shape):
            raise CheckpointError(f"{entry.hf_names} gives a {tuple(local.shape)} shard for {entry.global_name} "
                                  f"of shape {tuple(entry.tensor.shape)}: config.json and the weights disagree")
        with torch.no_grad():
            entry.tensor.copy_(local.to(entry.tensor.dtype))
    return read


# -- megatron -> HF -------------------------------------------------------------------------------------

def _gather_full(entry: _Entry) -> torch.Tensor:
    tensor = entry.tensor.detach()
    if entry.partition_dim is None:
        return tensor
    group, _, size = _tp_group(entry)
    if size == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    if entry.gated:  # each shard is [gate_i; up_i]: regroup into [gate; up]
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim=entry.partition_dim),
                          torch.cat([h[1] for h in halves], dim=entry.partition_dim)], dim=0)
    return torch.cat(shards, dim=entry.partition_dim)


def _local_hf_tensors(model) -> Dict[str, torch.Tensor]:
    out = {}
    entries = local_entries(model)
    # non-expert tensors first, then expert ones: each group sees its collectives in one order on all members
    for entry in sorted(entries, key=lambda e: e.is_expert):
        full = _gather_full(entry)
        if not entry.exported:
            continue
        pieces = full.chunk(len(entry.hf_names), dim=0) if len(entry.hf_names) > 1 else (full,)
        out.update(zip(entry.hf_names, pieces))
    return out


def iter_kimi_vl_hf_tensors(model, dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(published name, full tensor) for the whole model, in name order, on every rank.

    A collective over all ranks: tensor-parallel shards are gathered in their groups, then each tensor
    is broadcast from the first rank holding it (pipeline stages and expert ranks hold different ones)."""
    local = _local_hf_tensors(model)
    world = dist.get_world_size()
    inventories = [None] * world
    dist.all_gather_object(inventories, {name: (tuple(t.shape), t.dtype) for name, t in local.items()})
    owners: Dict[str, int] = {}
    for rank, inventory in enumerate(inventories):
        for name in inventory:
            owners.setdefault(name, rank)
    for name in sorted(owners):
        owner = owners[name]
        shape, tensor_dtype = inventories[owner][name]
        if dist.get_rank() == owner:
            tensor = local[name].contiguous()
        else:
            tensor = torch.empty(shape, dtype=tensor_dtype, device=next(iter(local.values())).device
                                 if local else "cpu")
        if world > 1:
            dist.broadcast(tensor, src=owner)
        yield name, tensor if dtype is None else tensor.to(dtype)
