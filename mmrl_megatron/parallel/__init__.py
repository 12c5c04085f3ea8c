"""Process placement (torchrun, Slurm, MPI), device and backend choice, the parallel layout (ParallelDims)
and megatron-core's groups: the one package that reads megatron.core.parallel_state."""
from .dims import ParallelDims, ParallelLayout
from .launcher_env import ProcessPlace, detect_process_place
from .setup import pick_device, seed_ranks, shutdown, start_processes

__all__ = ["ParallelDims", "ParallelLayout", "ProcessPlace", "detect_process_place", "pick_device", "seed_ranks",
           "shutdown", "start_processes"]
