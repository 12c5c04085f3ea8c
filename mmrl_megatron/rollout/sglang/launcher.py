"""Start, watch and stop one `python -m sglang.launch_server` subprocess.

The lowest local rank of each rollout tensor-parallel group runs one of these on the group's GPUs
(`--base-gpu-id`, `--tp`). The server listens on a free port of the configured host (loopback by
default, or the node's private interface, never 0.0.0.0 unless configured so), writes its log to a
file in the run directory, and is stopped when the engine shuts down or the process exits.
"""
import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional

from ...config.schema import SGLangConfig
from ..errors import RolloutError
from .client import SGLangClient

# Makes SGLang return log-probs before temperature scaling, which the trainer does not expect.
_ENV_REMOVED = ("SGLANG_RETURN_ORIGINAL_LOGPROB",)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def launch_command(config: SGLangConfig, model_path: str, host: str, port: int, base_gpu_id: int) -> List[str]:
    """The server command line for this group (flags as `python -m sglang.launch_server --help` spells them)."""
    command = [
        sys.executable, "-m", config.server_module,
        "--model-path", model_path,
        "--tp-size", str(config.tensor_parallel),
        "--base-gpu-id", str(base_gpu_id),
        "--mem-fraction-static", str(config.mem_fraction_static),
        "--host", host,
        "--port", str(port),
    ]
    if config.enable_memory_saver:
        command.append("--enable-memory-saver")
    if config.deterministic_inference:  # the only mode in which SGLang reads sampling_seed
        command.append("--enable-deterministic-inference")
    return command + list(config.extra_args)


class ServerProcess:
    """One SGLang server subprocess. start() returns its URL once /health answers."""

    def __init__(self, config: SGLangConfig, model_path: str, log_dir: str, base_gpu_id: int = 0, name: str = "sglang"):
        self.config = config
        self.model_path = model_path
        self.base_gpu_id = base_gpu_id
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.process: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None
        self.starts = 0
        os.makedirs(log_dir, exist_ok=True)
        atexit.register(self.stop)

    def start(self) -> str:
        self.stop()
        port = free_port(self.config.host)
        command = launch_command(self.config, self.model_path, self.config.host, port, self.base_gpu_id)
        environment = {key: value for key, value in os.environ.items() if key not in _ENV_REMOVED}
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start {self.starts}: {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )
        self.url = f"http://{self.config.host}:{port}"
        self._wait_healthy()
        return self.url

    def _wait_healthy(self) -> None:
        probe = SGLangClient(self.url, request_timeout_s=5.0, max_retries=0)
        deadline = time.monotonic() + self.config.start_timeout_s
        try:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RolloutError(
                        f"SGLang server exited with code {self.process.returncode} while starting "
                        f"(log {self.log_path}):\n{self.log_tail()}"
                    )
                if probe.is_healthy():
                    return
                time.sleep(0.5)
        finally:
            probe.close()
        self.stop()
        raise RolloutError(
            f"SGLang server at {self.url} was not healthy within start_timeout_s={self.config.start_timeout_s} "
            f"(log {self.log_path}):\n{self.log_tail()}"
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not os.path.exists(self.log_path):
            return "(no log written)"
        with open(self.log_path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])

    def stop(self) -> None:
        """Terminate the server's process group (SGLang forks scheduler and detokenizer processes)."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
