"""The rule-table vocabulary: which HF tensors make one Megatron parameter, and how.

A `Rule` names a Megatron parameter (a template over global names, with alternatives for other layer
specs) and the HF tensors it is built from; its `Transform` turns the HF tensors into this rank's
tensor-parallel shard and the gathered shards back into the HF tensors. The split axis comes from the
parameter itself (megatron-core marks `partition_dim` on tensor-parallel weights).
"""
import itertools
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

Tensors = List[torch.Tensor]


class Transform:
    """Identity: one HF tensor, split evenly along the parameter's partition axis."""

    def to_megatron(self, hf: Tensors, rank: int, size: int, axis: Optional[int], shard_shape) -> torch.Tensor:
        return hf[0] if axis is None else hf[0].chunk(size, dim=axis)[rank]

    def to_hf(self, shards: Tensors, axis: Optional[int]) -> Tensors:
        return [shards[0] if axis is None else torch.cat(shards, dim=axis)]


COPY = Transform()


@dataclass(frozen=True)
class PaddedVocab(Transform):
    """Embedding / output rows: zero rows pad the vocabulary to the model's size on load, cut on export."""

    vocab_size: int

    def to_megatron(self, hf, rank, size, axis, shard_shape):
        padded = shard_shape[0] * size
        if padded < hf[0].shape[0]:
            raise ValueError(f"the model's padded vocabulary ({padded}) is smaller than the checkpoint's "
                             f"({hf[0].shape[0]})")
        full = torch.nn.functional.pad(hf[0], (0, 0, 0, padded - hf[0].shape[0]))
        return full.chunk(size, dim=0)[rank]

    def to_hf(self, shards, axis):
        return [torch.cat(shards, dim=0)[:self.vocab_size]]


@dataclass(frozen=True)
class GroupedQKV(Transform):
    """q, k, v (or HF's fused [q; k; v]) -> Megatron's [q of group 0, k0, v0, q of group 1, ...] along
    dim 0, so that a contiguous TP shard holds whole query groups. Weights and biases alike."""

    num_heads: int
    num_groups: int
    head_dim: int
    fused_hf: bool = False

    def _split_sizes(self):
        return [self.num_heads * self.head_dim, self.num_groups * self.head_dim, self.num_groups * self.head_dim]

    def to_megatron(self, hf, rank, size, axis, shard_shape):
        query, key, value = hf[0].split(self._split_sizes(), dim=0) if self.fused_hf else hf
        tail = query.shape[1:]
        groups = [x.reshape(self.num_groups, -1, *tail) for x in (query, key, value)]
        full = torch.cat(groups, dim=1).reshape(-1, *tail)
        return full.chunk(size, dim=0)[rank]

    def to_hf(self, shards, axis):
        full = torch.cat(shards, dim=0)
        tail = full.shape[1:]
        per_group = self.num_heads // self.num_groups * self.head_dim
        query, key, value = full.reshape(self.num_groups, -1, *tail).split(
            [per_group, self.head_dim, self.head_dim], dim=1)
        parts = [x.reshape(-1, *tail) for x in (query, key, value)]
        return [torch.cat(parts, dim=0)] if self.fused_hf else parts


class GatedPair(Transform):
    """gate, up -> Megatron's fc1 shard [gate_i; up_i]: each is split over TP on its own."""

    def to_megatron(self, hf, rank, size, axis, shard_shape):
        gate, up = hf
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)

    def to_hf(self, shards, axis):
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return [torch.cat([half[0] for half in halves], dim=0), torch.cat([half[1] for half in halves], dim=0)]


GATED = GatedPair()


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter <-> its HF tensors.

    `megatron`: global-name templates, the first for our local spec, others for specs that name the
    same tensor differently (TE fuses norms into the next linear). `hf`: the HF names, in the order the
    transform takes them. `ranges`: placeholder -> count, e.g. (("layer", 28),). `export`: False when
    another rule already emits the HF tensor (a tied output layer). `optional`: may be absent from HF
    checkpoints (a critic's value head); loading then keeps the initial values. `buffer`: the Megatron
    tensor is a registered buffer, not a parameter (the MoE router's expert bias, which megatron updates
    outside the optimizer). `split_axis`: the axis its tensor-parallel shards are cut along, where the
    parameter's own partition_dim says otherwise (TEGroupedMLP's fc2 reports 0 but is split on its input).

    Placeholders take global values: `layer` the layer's global index (layer_number - 1, across pipeline
    stages), `expert` the global expert id (the MoE layer's local_expert_indices, across expert-parallel
    ranks; model_params.py)."""

    megatron: Tuple[str, ...]
    hf: Tuple[str, ...]
    transform: Transform = COPY
    ranges: Tuple[Tuple[str, int], ...] = ()
    export: bool = True
    optional: bool = False
    buffer: bool = False
    split_axis: Optional[int] = None

    def instances(self) -> Iterator[Dict[str, int]]:
        names = [name for name, _ in self.ranges]
        for values in itertools.product(*(range(count) for _, count in self.ranges)):
            yield dict(zip(names, values))

    def hf_names(self, values: Dict[str, int]) -> List[str]:
        return [template.format(**values) for template in self.hf]


def _template_regex(template: str) -> "re.Pattern":
    pattern = re.escape(template)
    pattern = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>\\d+)", pattern)
    return re.compile(pattern + "$")


class RuleTable:
    """A family's rules for one config: finds the rule of a global Megatron name, lists HF names in order.

    `aliases`: (stored prefix, canonical prefix) pairs under which checkpoints may hold the HF names."""

    def __init__(self, rules: Sequence[Rule], family: str, aliases: Sequence[Tuple[str, str]] = ()) -> None:
        self.rules = list(rules)
        self.family = family
        self.aliases = tuple(aliases)
        self._patterns = [(index, _template_regex(t)) for index, rule in enumerate(self.rules) for t in rule.megatron]

    def match(self, megatron_name: str) -> Optional[Tuple[int, Dict[str, int]]]:
        """(rule index, placeholder values) for a global Megatron parameter name, or None."""
        for index, pattern in self._patterns:
            found = pattern.match(megatron_name)
            if found:
                return index, {key: int(value) for key, value in found.groupdict().items()}
        return None

    def ordered_instances(self) -> List[Tuple[int, Dict[str, int]]]:
        """Every (rule, placeholder values) in the fixed export order: table order, then placeholders."""
        return [(index, values) for index, rule in enumerate(self.rules) for values in rule.instances()]

    def has_buffers(self) -> bool:
        return any(rule.buffer for rule in self.rules)

    def all_hf_names(self) -> set:
        return {name for index, values in self.ordered_instances() for name in self.rules[index].hf_names(values)}
