"""The run's parallel layout as one object, after torchtitan's ParallelDims: made from the sizes and validated
against the world size before any process group exists, given megatron-core's groups by start_processes
(setup.py), and passed explicitly to whatever communicates. Nothing outside this package reads megatron's
parallel_state: a module that needs a rank, a size or a group takes the ParallelDims as an argument."""
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from ..config.errors import ConfigError
from ..config.schema import Config, ParallelConfig
from ..config.validate import ModelShape, validate_layout, validate_parallel

# the megatron-core groups the project uses, by their ProcessGroupCollection names
_GROUP_NAMES = ("tp", "pp", "mp", "expt_tp", "tp_ep", "dp", "tp_dp_cp")


@dataclass(frozen=True)
class ParallelLayout:
    """The sizes of a layout: what megatron-core's configs are built from (ParallelDims.layout)."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    expert: int = 1
    expert_tensor: int = 1
    data: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.context * self.data


class ParallelDims:
    """Tensor, pipeline, context, expert, expert-tensor and data-parallel sizes on `world_size` processes.

    Made, the sizes are checked (ConfigError naming the parallel.* key: a size below 1, a product that does not
    divide the world, a model dimension (`shape`) a size does not divide, expert ranks that do not fit) and
    data=None is derived. The ranks and groups are there once start_processes has created megatron-core's
    groups for this layout; asked for before, they raise."""

    def __init__(self, world_size: int, tensor: int = 1, pipeline: int = 1, context: int = 1, expert: int = 1,
                 expert_tensor: Optional[int] = None, data: Optional[int] = None,
                 shape: Optional[ModelShape] = None):
        parallel = ParallelConfig(tensor=tensor, pipeline=pipeline, context=context, expert=expert,
                                  expert_tensor=expert_tensor, data=data)
        data = validate_parallel(parallel, world_size, shape)
        self.layout = ParallelLayout(tensor, pipeline, context, expert, expert_tensor or tensor, data)
        self._groups = None  # megatron.core.process_groups_config.ProcessGroupCollection, from start_processes

    @classmethod
    def from_config(cls, config: Config, world_size: int, shape: Optional[ModelShape]) -> "ParallelDims":
        """config.parallel on `world_size` processes, with data.prompts_per_step checked against the
        data-parallel size too (config.validate_layout)."""
        validate_layout(config, world_size, shape)
        p = config.parallel
        return cls(world_size, p.tensor, p.pipeline, p.context, p.expert, p.expert_tensor, p.data, shape)

    def __repr__(self) -> str:
        return f"ParallelDims({self.layout}, started={self._groups is not None})"

    # -- sizes: known from construction -----------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tensor(self) -> int:
        return self.layout.tensor

    @property
    def pipeline(self) -> int:
        return self.layout.pipeline

    @property
    def expert(self) -> int:
        return self.layout.expert

    @property
    def expert_tensor(self) -> int:
        return self.layout.expert_tensor

    @property
    def data(self) -> int:
        """Data-parallel replicas (context-parallel ranks not counted), megatron's data-parallel world size."""
        return self.layout.data

    # -- megatron-core's groups: after start_processes ------------------------------------------------
    def _create_groups(self) -> None:
        """Replace any megatron-core groups of this process with this layout's (every rank, collective)."""
        from megatron.core import parallel_state
        from megatron.core.process_groups_config import ProcessGroupCollection

        if dist.get_world_size() != self.world_size:
            raise ConfigError(f"{self.layout} was made for {self.world_size} processes but the job has "
                              f"{dist.get_world_size()}; make the ParallelDims from the job's world size")
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        layout = self.layout
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
            context_parallel_size=layout.context, expert_model_parallel_size=layout.expert,
            expert_tensor_parallel_size=layout.expert_tensor)
        self._groups = ProcessGroupCollection.use_mpu_process_groups(list(_GROUP_NAMES))

    def _group(self, name: str):
        if self._groups is None:
            raise RuntimeError(f"{self!r} has no process groups yet: call parallel.start_processes(dims, device)")
        return getattr(self._groups, name)

    @property
    def tensor_group(self):
        """The ranks a tensor-parallel layer (and the vocabulary) is split over."""
        return self._group("tp")

    @property
    def tensor_rank(self) -> int:
        return self.tensor_group.rank()

    @property
    def expert_tensor_group(self):
        """The ranks a routed expert's weights are split over."""
        return self._group("expt_tp")

    @property
    def expert_tensor_and_expert_group(self):
        """Expert-tensor x expert-parallel ranks: what megatron's all-gather token dispatcher gathers over."""
        return self._group("tp_ep")

    @property
    def pipeline_group(self):
        return self._group("pp")

    @property
    def pipeline_rank(self) -> int:
        return self.pipeline_group.rank()

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_rank == self.pipeline - 1

    @property
    def last_stage_rank(self) -> int:
        """The global rank of this pipeline's last stage (where the outputs are)."""
        return dist.get_global_rank(self.pipeline_group, self.pipeline - 1)

    @property
    def model_parallel_group(self):
        """The tensor x pipeline ranks that hold one model replica and share one data-parallel rank's data."""
        return self._group("mp")

    @property
    def data_parallel_group(self):
        """The replicas of this rank's shard (context-parallel ranks not included)."""
        return self._group("dp")

    @property
    def data_parallel_rank(self) -> int:
        return self.data_parallel_group.rank()

    @property
    def tensor_and_data_parallel_group(self):
        """Tensor x context x data-parallel ranks: one pipeline stage's ranks (the MoE routers' counts)."""
        return self._group("tp_dp_cp")
