"""ParallelDims: the layout is refused before any process group exists, with the offending parallel.* key named,
and once started it reports the ranks, sizes and groups megatron-core made."""
import pytest
import torch

from mmrl_megatron.config import ConfigError, ModelShape, load_config
from mmrl_megatron.parallel import ParallelDims, ParallelLayout
from tests.cpu_ranks import run_on_cpu_ranks

SHAPE = ModelShape(num_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=4)


@pytest.mark.parametrize("world_size, sizes, fragment", [
    (4, dict(tensor=0), "parallel.tensor=0 must be >= 1"),
    (4, dict(pipeline=-2), "parallel.pipeline=-2 must be >= 1"),
    (4, dict(expert_tensor=0), "parallel.expert_tensor=0 must be >= 1"),
    (6, dict(tensor=4), "parallel.tensor=4 x parallel.pipeline=1 x parallel.context=1 = 4 does not divide the "
                        "world size 6"),
    (4, dict(tensor=2, data=4), "parallel.data=4 = 8 != world size 4"),
    (8, dict(tensor=8), "parallel.tensor=8 does not divide the model's 4 attention heads"),
    (8, dict(pipeline=8), "parallel.pipeline=8 does not divide the model's 4 layers"),
    (8, dict(expert=8), "parallel.expert=8 does not divide the model's 4 experts"),
    (6, dict(expert=4), "parallel.expert=4 x parallel.expert_tensor=1 = 4 must divide data x context x tensor = 6"),
    (4, dict(tensor=2, expert=2, expert_tensor=4),
     "parallel.expert=2 x parallel.expert_tensor=4 = 8 must divide data x context x tensor = 4"),
])
def test_a_layout_that_cannot_run_is_refused_naming_the_key(world_size, sizes, fragment):
    """Invariant: a size below 1, a product that does not divide the world, a model dimension a size does not
    divide, or expert ranks that do not fit is one ConfigError, made before any process group exists, that
    names every factor and the key to change."""
    with pytest.raises(ConfigError) as error:
        ParallelDims(world_size, shape=SHAPE, **sizes)
    message = str(error.value)
    assert fragment in message and message.startswith("parallel layout tensor=")
    assert "\n" not in message


def test_sizes_are_known_and_data_derived_before_any_group():
    """Invariant: the sizes (data derived from the world, expert_tensor defaulting to tensor) are there at once;
    a rank or group asked for before start_processes names the call to make."""
    dims = ParallelDims(8, tensor=2, pipeline=2, expert=2, shape=SHAPE)
    assert dims.layout == ParallelLayout(tensor=2, pipeline=2, expert=2, expert_tensor=2, data=2)
    assert (dims.world_size, dims.data, dims.expert_tensor) == (8, 2, 2)
    with pytest.raises(RuntimeError, match="start_processes"):
        dims.tensor_group


def test_from_config_also_checks_the_prompts_per_data_parallel_rank():
    """Invariant: made from a config, the layout is checked with data.prompts_per_step, whose prompts must
    split evenly over the data-parallel ranks."""
    config = load_config(None, ["parallel.tensor=2", "data.prompts_per_step=3"])
    with pytest.raises(ConfigError, match="data.prompts_per_step=3 must be divisible by the data-parallel size 2"):
        ParallelDims.from_config(config, 4, SHAPE)


def _dims_and_megatron():
    """On each rank: a layout for another world refused by start_processes, then what a started TP=2 x PP=2
    ParallelDims reports next to what megatron-core's parallel_state says."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mmrl_megatron.parallel import start_processes

    try:
        start_processes(ParallelDims(2), torch.device("cpu"))
        refused = ""
    except ConfigError as error:
        refused = str(error)
    dims = start_processes(ParallelDims(dist.get_world_size(), tensor=2, pipeline=2), torch.device("cpu"))
    ours = dict(tensor=(dims.tensor, dims.tensor_rank), pipeline=(dims.pipeline, dims.pipeline_rank),
                stages=(dims.is_first_stage, dims.is_last_stage, dims.last_stage_rank),
                data=(dims.data, dims.data_parallel_rank), expert_tensor=dims.expert_tensor,
                groups=[dist.get_process_group_ranks(group) for group in (
                    dims.tensor_group, dims.pipeline_group, dims.model_parallel_group, dims.data_parallel_group,
                    dims.expert_tensor_group, dims.expert_tensor_and_expert_group,
                    dims.tensor_and_data_parallel_group)])
    theirs = dict(
        tensor=(ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()),
        pipeline=(ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()),
        stages=(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), ps.get_pipeline_model_parallel_last_rank()),
        data=(ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()),
        expert_tensor=ps.get_expert_tensor_parallel_world_size(),
        groups=[dist.get_process_group_ranks(group) for group in (
            ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
            ps.get_model_parallel_group(), ps.get_data_parallel_group(), ps.get_expert_tensor_parallel_group(),
            ps.get_expert_tensor_and_model_parallel_group(),
            ps.get_tensor_and_data_parallel_group(with_context_parallel=True))])
    return refused, ours, theirs


def test_started_dims_report_what_megatron_made_on_four_ranks():
    """Invariant: at TP=2 x PP=2 on 4 gloo ranks every rank, size, stage flag and group membership the
    ParallelDims reports is megatron-core's own; a layout made for another world size is refused at start."""
    results = run_on_cpu_ranks(4, _dims_and_megatron)
    for refused, ours, theirs in results:
        assert "made for 2 processes but the job has 4" in refused
        assert ours == theirs
    assert sorted(ours["tensor"][1] + 2 * ours["pipeline"][1] for _, ours, _ in results) == [0, 1, 2, 3]
