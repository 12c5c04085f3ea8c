"""HF checkpoint -> this rank's Megatron shards, reading only the tensors this rank holds."""
import re

import torch

from .errors import CheckpointError
from .hf_checkpoint import HFCheckpoint
from .model_params import sharded_params
from .rules import RuleTable
from .streaming import is_placeholder

# Rotary inverse frequencies, which checkpoints saved by older transformers carry beside the weights: every
# model derives them from config.json (rope_theta, rope_scaling, head sizes) when it is built, as transformers
# does (it registers them non-persistent, so it neither saves nor reads them). So no rule converts them: the
# loaders accept and skip them, and the exporters write the published weights only.
DERIVED_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def check_known(checkpoint: HFCheckpoint, table, hf_dir: str) -> None:
    """Raise CheckpointError naming the checkpoint tensors no rule of `table` converts (derived buffers aside)."""
    unknown = sorted(name for name in checkpoint.names() - table.all_hf_names() if not DERIVED_BUFFER.search(name))
    if unknown:
        raise CheckpointError(f"{hf_dir}: {len(unknown)} tensor(s) no rule converts, e.g. {unknown[:3]}; the "
                              f"config.json ({table.family}) does not describe these weights")


def load_hf_into_model(model, hf_dir: str, table: RuleTable, dims) -> None:
    """Fill every parameter (and converted buffer) of `model` (a module or this rank's list of chunks, built
    under the parallel.ParallelDims `dims`) from hf_dir through the family's rule `table`.

    Raises CheckpointError naming the tensor for a missing tensor, a wrong shape, a checkpoint tensor no
    rule converts, or a model parameter no rule fills. Tensors still on the meta device (a streamed
    conversion's other chunks, streaming.py) are left alone."""
    checkpoint = HFCheckpoint(hf_dir, table.aliases)
    check_known(checkpoint, table, hf_dir)
    for sharded in sharded_params(model, table, dims):
        if is_placeholder(sharded.param):
            continue
        found = table.match(sharded.name)
        if found is None:
            raise CheckpointError(f"model parameter {sharded.name} has no rule in models/{table.family}/conversion.py")
        rule = table.rules[found[0]]
        names = rule.hf_names(found[1])
        if rule.optional and not all(name in checkpoint for name in names):
            continue
        tensors = [checkpoint.get(name) for name in names]
        param = sharded.param
        try:
            shard = rule.transform.to_megatron(tensors, sharded.rank, sharded.size, sharded.axis, param.shape)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"{hf_dir}: {names} (shapes {[tuple(t.shape) for t in tensors]}) do not fit "
                                  f"{sharded.name}: {error}") from error
        if tuple(shard.shape) != tuple(param.shape):
            raise CheckpointError(f"{hf_dir}: {names} (shapes {[tuple(t.shape) for t in tensors]}) give a shard "
                                  f"of {tuple(shard.shape)} for {sharded.name}, whose shard is {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(shard)
