"""The server launcher runs `python -m <server_module>` with SGLang's flags, waits for health, logs, restarts and stops.

The fake server module stands in for sglang.launch_server (same flags), so these tests run real
subprocesses: a killed server is a dead process, and its log is a real file.
"""
import os

import pytest

from mmrl_megatron.config.schema import RolloutConfig, SGLangConfig
from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from mmrl_megatron.rollout.errors import RolloutError
from mmrl_megatron.rollout.sglang import SGLangEngine
from mmrl_megatron.rollout.sglang.launcher import ServerProcess, launch_command
from mmrl_megatron.rollout.types import RolloutRequest, SamplingParams

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE_MODULE = "tests.rollout.fake_sglang_server"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen")), seed=0)


@pytest.fixture(autouse=True)
def importable_tests(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")  # must not reach the server


def test_launch_command_carries_the_configured_flags():
    """tp size, GPU offset, memory fraction, memory saver, loopback host, free port, extra args."""
    config = SGLangConfig(tensor_parallel=2, mem_fraction_static=0.5, extra_args=["--attention-backend", "fa3"])
    command = launch_command(config, "/models/qwen", "127.0.0.1", 31000, base_gpu_id=2)
    assert command[1:3] == ["-m", "sglang.launch_server"]
    flags = dict(zip(command[3::2], command[4::2]))
    assert flags["--model-path"] == "/models/qwen" and flags["--tp-size"] == "2" and flags["--base-gpu-id"] == "2"
    assert flags["--mem-fraction-static"] == "0.5" and flags["--host"] == "127.0.0.1" and flags["--port"] == "31000"
    assert "--enable-memory-saver" in command and command[-2:] == ["--attention-backend", "fa3"]


def test_subprocess_server_is_restarted_after_dying_and_stopped_on_shutdown(hf_dir, tmp_path):
    """A server process killed mid-rollout is relaunched; the samples it answered are kept; shutdown stops it."""
    config = RolloutConfig(backend="sglang")
    config.sglang.server_module = FAKE_MODULE
    config.sglang.start_timeout_s = 60
    config.sglang.max_retries = 0
    config.sglang.max_concurrent_requests = 1
    config.sglang.extra_args = ["--crash-after-generates", "2"]  # every server process dies after 2 answers
    config.sglang.max_restarts = 1
    engine = SGLangEngine(config, hf_dir, log_dir=str(tmp_path))
    process = engine.launcher
    try:
        results = engine.generate([RolloutRequest(prompt_ids=[5, 6])], SamplingParams(n=3, max_new_tokens=2, seed=3))
        assert [result.sample_index for result in results] == list(range(3))
        assert process.starts == 2  # 2 answers from the first process, 1 from the second
        log = open(process.log_path).read()
        assert log.count("===== start") == 2
        assert log.count("SGLANG_RETURN_ORIGINAL_LOGPROB=None") == 2
    finally:
        engine.shutdown()
    assert not process.alive()


def test_a_server_that_never_becomes_healthy_fails_with_its_log(tmp_path):
    """Start failure: the error names the log file and carries its tail."""
    config = SGLangConfig(server_module=FAKE_MODULE, start_timeout_s=30)
    server = ServerProcess(config, str(tmp_path / "missing_model"), str(tmp_path))
    with pytest.raises(RolloutError, match="exited with code(.|\n)*missing_model"):
        server.start()
    assert not server.alive()
