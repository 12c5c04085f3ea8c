"""Run a test body on N CPU ranks (gloo), each a fresh spawned process with megatron-core's CUDA
calls redirected to the CPU; the body's return values come back to the test, failures with tracebacks."""
import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp

RANK_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, body, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        import torch
        import torch.distributed as dist

        from mmrl_megatron.parallel.cpu_support import enable_cpu_execution

        torch.set_num_threads(1)
        enable_cpu_execution()
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            # by value: torch's queue pickler shares tensors through a socket the child closes when it exits,
            # which raced the parent's read (FileNotFoundError in multiprocessing's resource_sharer)
            results.put((rank, "ok", pickle.dumps(body(*args))))
        finally:
            from mmrl_megatron.parallel import shutdown

            shutdown()
    except BaseException:  # noqa: B902 - every failure must reach the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))


def run_on_cpu_ranks(world_size: int, body, *args):
    """Call body(*args) on `world_size` gloo ranks; returns the per-rank results in rank order.

    `body` must be a module-level function (it is pickled into spawned processes)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank_main, args=(rank, world_size, port, body, args, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    collected, errors = {}, []
    try:
        for _ in processes:
            rank, status, value = results.get(timeout=RANK_TIMEOUT_S)
            if status == "ok":
                collected[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for process in processes:
            process.join(timeout=5 if errors else RANK_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
    if errors:
        raise AssertionError("\n".join(errors))
    return [collected[rank] for rank in range(world_size)]
