"""Rank, world size and rendezvous address are read from torchrun, Slurm or a bare run."""
from mmrl_megatron.parallel.launcher_env import detect_process_place
from mmrl_megatron.parallel.slurm_nodes import expand_nodelist

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                    "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _clear(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_torchrun_variables(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    place = detect_process_place()
    assert (place.rank, place.world_size, place.local_rank, place.master_addr, place.launcher) == (5, 8, 1, "node0", "torchrun")


def test_slurm_variables_use_first_node(monkeypatch):
    """Invariant: under a bare srun the rendezvous host is the first node of the expanded list."""
    _clear(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "gpu-[07-08]")
    place = detect_process_place()
    assert (place.rank, place.world_size, place.local_rank, place.master_addr, place.launcher) == (9, 16, 1, "gpu-07", "slurm")


def test_single_process_default(monkeypatch):
    _clear(monkeypatch)
    assert detect_process_place().launcher == "single"


def test_nodelist_expansion():
    assert expand_nodelist("gpu-[07-08,10],login1") == ["gpu-07", "gpu-08", "gpu-10", "login1"]
    assert expand_nodelist("rack[1-2]-n[01-02]") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]
