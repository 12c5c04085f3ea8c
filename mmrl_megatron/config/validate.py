"""Checks that need more than the schema: the parallel layout against the world size and the model."""
from dataclasses import dataclass
from typing import Mapping, Optional

from .bounds import out_of_bounds
from .errors import ConfigError
from .schema import Config, ParallelConfig


@dataclass(frozen=True)
class ModelShape:
    """The dimensions a parallel layout must divide."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int = 0


def model_shape(hf_config: Mapping) -> ModelShape:
    """The language-model dimensions of a config.json dict (flat 4.x or nested 5.x `text_config`)."""
    text = hf_config.get("text_config") or hf_config
    heads = text.get("num_attention_heads", hf_config.get("num_attention_heads"))
    layers = text.get("num_hidden_layers", hf_config.get("num_hidden_layers"))
    if not isinstance(heads, int) or not isinstance(layers, int):
        raise ConfigError("model.hf_path: its config.json has no integer num_attention_heads / num_hidden_layers "
                          "(in text_config or at the top level)")
    return ModelShape(
        num_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=text.get("num_key_value_heads") or heads,
        num_experts=text.get("n_routed_experts") or 0,
    )


def describe_layout(parallel: ParallelConfig, world_size: int) -> str:
    """Every factor of the layout and the process count, the prefix of each layout error."""
    p = parallel
    data = "derived" if p.data is None else p.data
    return (f"parallel layout tensor={p.tensor} pipeline={p.pipeline} context={p.context} expert={p.expert} "
            f"expert_tensor={p.expert_tensor or p.tensor} data={data} on {world_size} processes")


def resolve_data_parallel(parallel: ParallelConfig, world_size: int) -> int:
    """Fill parallel.data from the world size, or check the one given; raises ConfigError naming every factor."""
    p = parallel
    model_parallel = p.tensor * p.pipeline * p.context
    factors = f"parallel.tensor={p.tensor} x parallel.pipeline={p.pipeline} x parallel.context={p.context}"
    if p.data is None:
        if world_size % model_parallel:
            raise ConfigError(f"{factors} = {model_parallel} does not divide the world size {world_size}; "
                              "change parallel.tensor/pipeline/context or the number of processes")
        return world_size // model_parallel
    if model_parallel * p.data != world_size:
        raise ConfigError(f"{factors} x parallel.data={p.data} = {model_parallel * p.data} != world size {world_size}; "
                          "set parallel.data=null to derive it or change the factors")
    return p.data


def _check_parallel(parallel: ParallelConfig, world_size: int, shape: Optional[ModelShape]) -> int:
    sizes = out_of_bounds(parallel, "parallel.")  # config files are bounds-checked on load; sizes given in code are not
    if sizes:
        raise ConfigError("; ".join(sizes))
    data_parallel = resolve_data_parallel(parallel, world_size)
    p = parallel
    if shape is not None:
        if shape.num_attention_heads % p.tensor:
            raise ConfigError(f"parallel.tensor={p.tensor} does not divide the model's "
                              f"{shape.num_attention_heads} attention heads; choose a divisor")
        if shape.num_key_value_heads % p.tensor:
            raise ConfigError(f"parallel.tensor={p.tensor} does not divide the model's "
                              f"{shape.num_key_value_heads} key-value heads; choose a divisor")
        if shape.num_layers % p.pipeline:
            raise ConfigError(f"parallel.pipeline={p.pipeline} does not divide the model's "
                              f"{shape.num_layers} layers; choose a divisor")
        if p.expert > 1 and shape.num_experts % p.expert:
            raise ConfigError(f"parallel.expert={p.expert} does not divide the model's {shape.num_experts} experts")
    # megatron-core lays the expert-parallel and expert-tensor-parallel ranks out inside each pipeline stage
    expert_ranks, stage_ranks = p.expert * (p.expert_tensor or p.tensor), data_parallel * p.context * p.tensor
    if stage_ranks % expert_ranks:
        raise ConfigError(f"parallel.expert={p.expert} x parallel.expert_tensor={p.expert_tensor or p.tensor} = "
                          f"{expert_ranks} must divide data x context x tensor = {stage_ranks}")
    return data_parallel


def _with_layout_prefix(check, parallel: ParallelConfig, world_size: int):
    try:
        return check()
    except ConfigError as error:
        raise ConfigError(f"{describe_layout(parallel, world_size)}: {error}") from None


def validate_parallel(parallel: ParallelConfig, world_size: int, shape: Optional[ModelShape]) -> int:
    """Check the sizes (config.parallel) against the world size and the model, if given; returns the
    data-parallel size. Each ConfigError starts with every factor of the layout, then says which does not fit."""
    return _with_layout_prefix(lambda: _check_parallel(parallel, world_size, shape), parallel, world_size)


def validate_layout(config: Config, world_size: int, shape: Optional[ModelShape]) -> int:
    """validate_parallel for config.parallel, and data.prompts_per_step against the data-parallel size (all
    samples of a prompt stay on one rank); returns the data-parallel size."""

    def check() -> int:
        data_parallel = _check_parallel(config.parallel, world_size, shape)
        if config.data.prompts_per_step % data_parallel:
            raise ConfigError(f"data.prompts_per_step={config.data.prompts_per_step} must be divisible by the "
                              f"data-parallel size {data_parallel} (all samples of a prompt stay on one rank)")
        return data_parallel

    return _with_layout_prefix(check, config.parallel, world_size)
