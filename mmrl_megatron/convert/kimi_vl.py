"""Kimi-VL: the rule table between megatron-core names and the published checkpoint names, and the
expert-parallel loader/exporter that applies it.

Megatron names are models/kimi_vl's: `language_model.` + megatron-core GPTModel names (local layer spec,
MLA, MoE with SequentialMLP or TE's grouped experts), and `vision_tower.*` / `multi_modal_projector.*`,
which equal the checkpoint's. Rules use the global layer index and the global expert id: per rank,
layer = layer_number - 1 and expert = ep_rank * experts_per_rank + local id (mbridge, Megatron-Bridge and
slime do the same). MLA tensors are copied as they are (megatron's MLA applies DeepSeek's interleaved
rope itself). Tensor-parallel splits follow each parameter's own `partition_dim`, over the expert-TP
group for expert weights; gated fc1 weights split gate and up separately (rules.GATED).

The generic loader/exporter (convert/loader.py, exporter.py) do not know expert parallelism or the
router's expert-bias buffer, so this module applies the same rule table with both: `load_hf_into_model`
and `iter_hf_tensors`, which convert's entry points of the same names call for kimi_vl (families.py).
Like the generic loader, it refuses checkpoint tensors no rule converts and skips rotary inv_freq buffers,
which the model derives from config.json (loader.check_known).
"""
import re
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from .errors import CheckpointError
from .hf_checkpoint import HFCheckpoint
from .loader import check_known
from .model_params import as_chunks, is_routed_expert
from .rules import GATED, Rule, RuleTable
from .streaming import is_placeholder

ALIASES = ()
_M = "language_model.decoder.layers.{layer}."
_H = "language_model.model.layers.{layer}."
_VISION_BLOCK = ("norm0", "norm1", "wqkv", "wo", "mlp.fc0", "mlp.fc1")


def _language_rules(text: Mapping) -> List[Rule]:
    layers = (("layer", text["num_hidden_layers"]),)
    experts = layers + (("expert", text["n_routed_experts"]),)
    attention = [("linear_q_proj", "q_proj"), ("linear_q_down_proj", "q_a_proj"), ("q_layernorm", "q_a_layernorm"),
                 ("linear_q_up_proj", "q_b_proj"), ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
                 ("kv_layernorm", "kv_a_layernorm"), ("linear_kv_up_proj", "kv_b_proj"), ("linear_proj", "o_proj")]
    table = [
        Rule(("language_model.embedding.word_embeddings.weight",), ("language_model.model.embed_tokens.weight",)),
        Rule(("language_model.decoder.final_layernorm.weight",), ("language_model.model.norm.weight",)),
        Rule((_M + "input_layernorm.weight",), (_H + "input_layernorm.weight",), ranges=layers),
        Rule((_M + "pre_mlp_layernorm.weight",), (_H + "post_attention_layernorm.weight",), ranges=layers),
    ]
    table += [Rule((f"{_M}self_attention.{ours}.weight",), (f"{_H}self_attn.{theirs}.weight",), ranges=layers)
              for ours, theirs in attention]
    for ours, theirs in (("mlp", "mlp"), ("mlp.shared_experts", "mlp.shared_experts")):
        table += [Rule((f"{_M}{ours}.linear_fc1.weight",), (f"{_H}{theirs}.gate_proj.weight", f"{_H}{theirs}.up_proj.weight"),
                       GATED, layers),
                  Rule((f"{_M}{ours}.linear_fc2.weight",), (f"{_H}{theirs}.down_proj.weight",), ranges=layers)]
    table += [
        Rule((_M + "mlp.router.weight",), (_H + "mlp.gate.weight",), ranges=layers),
        Rule((_M + "mlp.router.expert_bias",), (_H + "mlp.gate.e_score_correction_bias",), ranges=layers),
        # SequentialMLP (local spec) and TEGroupedMLP (grouped GEMM) name the same expert weights differently
        Rule((_M + "mlp.experts.local_experts.{expert}.linear_fc1.weight", _M + "mlp.experts.linear_fc1.weight{expert}"),
             (_H + "mlp.experts.{expert}.gate_proj.weight", _H + "mlp.experts.{expert}.up_proj.weight"), GATED, experts),
        Rule((_M + "mlp.experts.local_experts.{expert}.linear_fc2.weight", _M + "mlp.experts.linear_fc2.weight{expert}"),
             (_H + "mlp.experts.{expert}.down_proj.weight",), ranges=experts),
    ]
    if text.get("tie_word_embeddings", False):
        # the last stage's copy of the embedding (pipeline > 1); exported once, as the embedding
        table.append(Rule(("language_model.output_layer.weight",), ("language_model.model.embed_tokens.weight",),
                          export=False))
    else:
        table.append(Rule(("language_model.output_layer.weight",), ("language_model.lm_head.weight",)))
    return table


def _vision_rules(vision: Mapping) -> List[Rule]:
    """The replicated tower and projector: the same names on both sides."""
    blocks = (("block", vision.get("num_hidden_layers", 27)),)
    names = ["vision_tower.patch_embed.proj.weight", "vision_tower.patch_embed.proj.bias",
             "vision_tower.patch_embed.pos_emb.weight", "vision_tower.encoder.final_layernorm.weight",
             "vision_tower.encoder.final_layernorm.bias"]
    names += [f"multi_modal_projector.{module}.{kind}" for module in ("pre_norm", "linear_1", "linear_2")
              for kind in ("weight", "bias")]
    table = [Rule((name,), (name,)) for name in names]
    table += [Rule((f"vision_tower.encoder.blocks.{{block}}.{module}.{kind}",),
                   (f"vision_tower.encoder.blocks.{{block}}.{module}.{kind}",), ranges=blocks)
              for module in _VISION_BLOCK for kind in ("weight", "bias")]
    return table


def rules(hf_config: Mapping, role: str) -> List[Rule]:
    """The rule table for a kimi_vl config.json (dict); roles "actor"/"reference" (no critic head yet)."""
    if role == "critic":
        raise CheckpointError("Kimi-VL has no critic head: no rules for role 'critic'")
    return _language_rules(hf_config["text_config"]) + _vision_rules(hf_config.get("vision_config", {}))


# -- this rank's tensors under global names -------------------------------------------------------

class _Entry:
    """One local megatron tensor, its rule, and the group its tensor-parallel shards are spread over."""

    def __init__(self, tensor: torch.Tensor, global_name: str, is_expert: bool, table: RuleTable):
        from megatron.core import parallel_state

        found = table.match(global_name)
        if found is None:
            raise CheckpointError(f"model tensor {global_name} has no rule in convert/kimi_vl.py")
        self.tensor, self.global_name, self.is_expert = tensor, global_name, is_expert
        self.rule = table.rules[found[0]]
        self.hf_names = self.rule.hf_names(found[1])
        self.group, self.axis = None, None
        if getattr(tensor, "tensor_model_parallel", False):
            group = (parallel_state.get_expert_tensor_parallel_group() if is_expert
                     else parallel_state.get_tensor_model_parallel_group())
            if dist.get_world_size(group) > 1:
                # TEGroupedMLP's fc2 reports partition_dim 0 but is split on its input dimension (slime, mbridge)
                grouped_fc2 = re.search(r"experts\.linear_fc2\.weight\d+$", global_name)
                self.group, self.axis = group, 1 if grouped_fc2 else tensor.partition_dim

    @property
    def rank_and_size(self) -> Tuple[int, int]:
        return (0, 1) if self.group is None else (dist.get_rank(self.group), dist.get_world_size(self.group))


def _global_name(name: str, layers: Dict[int, int], expert_offset: int) -> str:
    name = re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{layers[int(m.group(1))]}.", name)
    name = re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{int(m.group(1)) + expert_offset}.", name)
    return re.sub(r"(experts\.linear_fc[12]\.weight)(\d+)$", lambda m: f"{m.group(1)}{int(m.group(2)) + expert_offset}",
                  name)


def local_entries(model) -> List[_Entry]:
    """Every parameter and router expert-bias buffer of this rank (one model chunk), in a fixed order."""
    from megatron.core import parallel_state

    [chunk] = as_chunks(model)
    language = chunk.language_model
    layers = {index: layer.layer_number - 1 for index, layer in enumerate(language.decoder.layers)}
    per_rank = (language.config.num_moe_experts or 0) // parallel_state.get_expert_model_parallel_world_size()
    expert_offset = parallel_state.get_expert_model_parallel_rank() * per_rank
    table = RuleTable(rules(chunk.hf_config, "actor"), "kimi_vl")
    tensors = list(chunk.named_parameters()) + [(name, buffer) for name, buffer in chunk.named_buffers()
                                                if name.endswith("router.expert_bias")]
    return [_Entry(tensor, _global_name(name, layers, expert_offset), is_routed_expert(name), table)
            for name, tensor in tensors]


# -- HF -> megatron -----------------------------------------------------------------------------------

def load_hf_into_model(model, hf_dir: str, hf_config: Optional[Mapping] = None) -> int:
    """Fill this rank's shards of a KimiVLModel (or its one-chunk list) from the published checkpoint;
    returns the number of HF tensors read. Tensors on the meta device (a streamed conversion's other
    chunks) are left alone. hf_config is accepted for the framework's signature (the model carries its own).
    Raises CheckpointError naming a checkpoint tensor no rule converts, as the generic loader does."""
    checkpoint = HFCheckpoint(hf_dir, ALIASES)
    [chunk] = as_chunks(model)
    check_known(checkpoint, RuleTable(rules(chunk.hf_config, "actor"), "kimi_vl"), hf_dir)
    read = 0
    for entry in local_entries(model):
        if is_placeholder(entry.tensor):
            continue
        hf = [checkpoint.get(name) for name in entry.hf_names]
        read += len(hf)
        rank, size = entry.rank_and_size
        local = entry.rule.transform.to_megatron(hf, rank, size, entry.axis, entry.tensor.shape)
        if tuple(local.shape) != tuple(entry.tensor.shape):
            raise CheckpointError(f"{hf_dir}: {entry.hf_names} give a {tuple(local.shape)} shard for "
                                  f"{entry.global_name} of shape {tuple(entry.tensor.shape)}: config.json and the "
                                  "weights disagree")
        with torch.no_grad():
            entry.tensor.copy_(local.to(entry.tensor.dtype))
    return read


# -- megatron -> HF -------------------------------------------------------------------------------------

def _gathered(entry: _Entry) -> List[torch.Tensor]:
    tensor = entry.tensor.detach().contiguous()
    if entry.group is None:
        return entry.rule.transform.to_hf([tensor], None)
    shards = [torch.empty_like(tensor) for _ in range(entry.rank_and_size[1])]
    dist.all_gather(shards, tensor, group=entry.group)
    return entry.rule.transform.to_hf(shards, entry.axis)


def _local_hf_tensors(model) -> Dict[str, torch.Tensor]:
    out = {}
    # non-expert tensors first, then expert ones: each group sees its collectives in one order on all members
    for entry in sorted(local_entries(model), key=lambda e: e.is_expert):
        if is_placeholder(entry.tensor):
            continue
        tensors = _gathered(entry)
        if entry.rule.export:
            out.update(zip(entry.hf_names, (t.contiguous() for t in tensors)))
    return out


def iter_hf_tensors(model, dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(published name, full tensor) for the whole model, in name order, on every rank.

    A collective over all ranks: tensor-parallel shards are gathered in their groups, then each tensor is
    broadcast from the first rank holding it (pipeline stages and expert-parallel ranks hold different
    ones). Tensors keep the parameters' dtype (the router bias is fp32) unless `dtype` is given; tensors on
    the meta device (outside a streamed conversion's current chunk) are not exported."""
    local = _local_hf_tensors(model)
    inventories = [None] * dist.get_world_size()
    dist.all_gather_object(inventories, {name: (tuple(t.shape), t.dtype) for name, t in local.items()})
    owners: Dict[str, int] = {}
    for rank, inventory in enumerate(inventories):
        for name in inventory:
            owners.setdefault(name, rank)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for name in sorted(owners):
        owner = owners[name]
        shape, tensor_dtype = inventories[owner][name]
        tensor = local[name] if dist.get_rank() == owner else torch.empty(shape, dtype=tensor_dtype, device=device)
        if dist.get_world_size() > 1:
            dist.broadcast(tensor, src=owner)
        yield name, tensor if dtype is None else tensor.to(dtype)
