"""Run an answer-reward function in worker processes, each call under a deadline.

Processes rather than threads because a hung or crashing user function must be stoppable (a thread
cannot be killed), and because math-verify's own timeouts need a main thread. Workers are fresh
interpreters (`python -m mmrl_megatron.rewards.worker_main`), not forks or multiprocessing spawns: a fork
would copy the trainer's CUDA and communicator state, and a spawn re-imports the launcher's main module
(torch, megatron) in every worker. A worker that times out or dies is replaced.
"""
import os
import subprocess
import sys
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmrl_megatron.rewards.errors import RewardError

STARTUP_TIMEOUT_S = 300.0  # importing a user's module (and what it imports) may be slow on a busy node
Outcome = Tuple[Optional[Tuple[float, float, dict]], Optional[str]]  # ((score, accuracy, extras), error)
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Worker:
    def __init__(self, spec: str):
        request_read, request_write = os.pipe()
        result_read, result_write = os.pipe()
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [_PACKAGE_ROOT] + [path for path in [os.environ.get("PYTHONPATH")] if path]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mmrl_megatron.rewards.worker_main", str(request_read), str(result_write), spec],
            pass_fds=(request_read, result_write), env=environment)
        os.close(request_read)
        os.close(result_write)
        self.requests = Connection(request_write, readable=False)
        self.results = Connection(result_read, writable=False)

    def wait_ready(self, spec: str) -> "_Worker":
        """Block until the worker has imported its function, so start-up time never counts against a call."""
        if self.results.poll(STARTUP_TIMEOUT_S):
            try:
                if self.results.recv() == ("ready",):
                    return self
            except EOFError:
                pass
        self.stop()
        raise RewardError(f"reward worker for {spec!r} did not start (exit code {self.process.returncode}); "
                          f"run `python -m mmrl_megatron.rewards.worker_main` to see why")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.requests.close()
        self.results.close()


class FunctionWorkers:
    """`num_workers` processes running the function named by `spec` on keyword arguments, `timeout_s` per call."""

    def __init__(self, spec: str, num_workers: int, timeout_s: float):
        self.spec, self.timeout_s = spec, timeout_s
        self._workers = [worker.wait_ready(spec) for worker in [_Worker(spec) for _ in range(max(1, num_workers))]]

    def run(self, calls: Sequence[Dict[str, Any]]) -> List[Outcome]:
        """One outcome per call's keyword arguments, in order: the result, or None with the error (raised, timed out,
        died). The deadline of a call starts when it is handed to a worker. Raises RewardError, once every call has
        finished, when the function returned a result of the wrong type (a string, say)."""
        outcomes: List[Outcome] = [(None, "not run")] * len(calls)
        wrong_type: List[str] = []
        pending = deque(enumerate(calls))
        idle, busy = list(self._workers), {}
        while pending or busy:
            while idle and pending:
                worker, (number, arguments) = idle.pop(), pending.popleft()
                try:
                    worker.requests.send((number, dict(arguments)))
                except (BrokenPipeError, OSError):
                    outcomes[number] = (None, f"worker died (exit code {worker.process.poll()})")
                    idle.append(self._replace(worker))
                    continue
                busy[worker.results] = (worker, number, time.monotonic() + self.timeout_s)
            if not busy:
                continue
            soonest = min(deadline for _, _, deadline in busy.values())
            for connection in wait(list(busy), timeout=max(0.0, soonest - time.monotonic())):
                worker, number, _ = busy.pop(connection)
                try:
                    _, result, error, is_wrong_type = connection.recv()
                    outcomes[number] = (result, error)
                    wrong_type += [error] if is_wrong_type else []
                except (EOFError, OSError):
                    outcomes[number] = (None, f"worker died (exit code {worker.process.wait()})")
                    worker = self._replace(worker)
                idle.append(worker)
            now = time.monotonic()
            for connection, (worker, number, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[connection]
                    outcomes[number] = (None, f"timeout after {self.timeout_s:g} s")
                    idle.append(self._replace(worker))
        if wrong_type:
            raise RewardError(wrong_type[0])
        return outcomes

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        replacement = _Worker(self.spec).wait_ready(self.spec)
        self._workers[self._workers.index(worker)] = replacement
        return replacement

    def close(self) -> None:
        """Close the request pipes (workers exit on end of input); kill any worker that does not."""
        for worker in self._workers:
            worker.requests.close()
        for worker in self._workers:
            try:
                worker.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            worker.results.close()
