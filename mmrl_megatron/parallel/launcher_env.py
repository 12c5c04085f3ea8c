"""Where this process sits in the job: read from torchrun, srun (SLURM_*) or mpirun (mpi4py)."""
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessPlace:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | mpi | single


def _first_slurm_host() -> str:
    # SLURM_NODELIST is compressed ("gpu-[07-08]"); the launch scripts export MASTER_ADDR, so this is
    # only the fallback for a bare `srun python ...`.
    from .slurm_nodes import expand_nodelist

    return expand_nodelist(os.environ.get("SLURM_NODELIST", "127.0.0.1"))[0]


def detect_process_place(default_port: int = 29500) -> ProcessPlace:
    """torchrun's variables win, then Slurm's, then MPI's; a bare `python` run is a single process."""
    env = os.environ
    port = int(env.get("MASTER_PORT", default_port))
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessPlace(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                            env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return ProcessPlace(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                            env.get("MASTER_ADDR") or _first_slurm_host(), port, "slurm")
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        master = comm.bcast(env.get("MASTER_ADDR", MPI.Get_processor_name()), root=0)
        return ProcessPlace(comm.Get_rank(), comm.Get_size(), local.Get_rank(), master, port, "mpi")
    return ProcessPlace(0, 1, 0, "127.0.0.1", port, "single")
