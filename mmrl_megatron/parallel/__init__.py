"""Process placement (torchrun, Slurm, MPI), device and backend choice, megatron-core groups."""
from .launcher_env import ProcessPlace, detect_process_place
from .setup import ParallelLayout, init_distributed, init_model_parallel, layout_from_config, pick_device, shutdown

__all__ = ["ParallelLayout", "ProcessPlace", "detect_process_place", "init_distributed",
           "init_model_parallel", "layout_from_config", "pick_device", "shutdown"]
