"""launch/train.py with a bad config, data path or layout: one line from rank 0, exit status 2, and nothing
started (no process group, no model), because every such mistake is found before start_processes."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mmrl_megatron.data.format import write_rows
from mmrl_megatron.data.synthetic import make_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(ROOT, "yaml_configs", "demo_cpu.yaml")


class ProcessesStarted(Exception):
    """Raised by the stand-in for start_processes: the run got past every check made before it."""


def _train_entry():
    spec = importlib.util.spec_from_file_location("launch_train", os.path.join(ROOT, "launch", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def assets(tmp_path):
    """A model directory holding only config.json (4 layers, 4 heads, 2 key-value heads) and a small train file."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "num_hidden_layers": 4,
                                                   "num_attention_heads": 4, "num_key_value_heads": 2}))
    write_rows(str(tmp_path / "train.parquet"), make_rows(4, seed=0, split="train"))
    return tmp_path


@pytest.fixture
def launch(assets, monkeypatch, capsys):
    """launch/train.py's main on the demo config pointed at `assets`, as global rank `rank` of `world_size`;
    returns (exit status, stderr lines). start_processes raises ProcessesStarted."""
    import mmrl_megatron.parallel as parallel

    def refuse_to_start(dims, device, seed=None):
        raise ProcessesStarted()

    monkeypatch.setattr(parallel, "start_processes", refuse_to_start)

    def run(*overrides, config=DEMO_CONFIG, rank=0, world_size=1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        status = _train_entry().main(["--config", str(config), f"model.hf_path={assets}/model",
                                      f"data.train_files=[{assets}/train.parquet]", "data.val_files=[]",
                                      f"trainer.run_dir={assets}/run", "data.prompts_per_step=2", *overrides])
        return status, capsys.readouterr().err.splitlines()

    return run


@pytest.mark.parametrize("override, message", [
    ("actor.optim.lr=-1", "config error: actor.optim.lr=-1.0 must be > 0"),
    ("critic.optim.lr=0", "config error: critic.optim.lr=0.0 must be > 0"),
    ("rollout.n=0", "config error: rollout.n=0 must be >= 1"),
    ("rollout.top_p=1.5", "config error: rollout.top_p=1.5 must be in (0, 1]"),
    ("actor.micro_batch_tokens=-8", "config error: actor.micro_batch_tokens=-8 must be >= 1"),
    ("algorithm.advantage=ppo", "config error: algorithm.advantage='ppo' is not a registered advantage estimator; "
                                "registered: grpo, rloo, reinforce_plus_plus, gae (add one with "
                                "algorithms.register_advantage_estimator in a file named in algorithm.plugins)"),
])
def test_invalid_value_is_one_line_before_anything_starts(launch, override, message):
    """Invariant: an out-of-range or unknown value stops the run with one line naming the key, exit 2, before
    processes start (so before any model is built)."""
    assert launch(override) == (2, [message])


def test_a_valid_config_gets_as_far_as_starting_processes(launch):
    """Invariant (the control for this file's other tests): the checks pass a good config through to
    start_processes, so a test here that sees exit 2 saw a check fail, not the stand-in."""
    with pytest.raises(ProcessesStarted):
        launch()


def test_yaml_syntax_error_names_file_and_line(launch, tmp_path):
    """Invariant: a YAML syntax error is one line naming the file and the line, not a yaml traceback."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  steps: 3\n   seed: 4\nrollout:\n  n: 2\n")  # line 3 indented one too far
    assert launch(config=broken) == (2, [f"config error: config file {broken} is not valid YAML at line 3, "
                                         "column 8: mapping values are not allowed in this context"])


def test_missing_train_file_is_named_before_anything_starts(launch, assets):
    """Invariant: a train file that does not exist is named in one line before processes start."""
    missing = assets / "missing.parquet"
    status, lines = launch(f"data.train_files=[{missing}]", "trainer.prepare_demo_assets=false")
    assert (status, lines) == (2, [f"data error: {missing}: no such file; check data.train_files / data.val_files"])


def test_demo_assets_do_not_fill_a_mistyped_path(launch, assets):
    """Invariant: with trainer.prepare_demo_assets and the demo model already built, a data path that does not
    exist is an error naming it, and no synthetic file appears there."""
    mistyped = assets / "trian.parquet"
    status, lines = launch(f"data.train_files=[{mistyped}]")
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith(f"config error: data file {mistyped} does not exist; trainer.prepare_demo_assets")
    assert not mistyped.exists()


def test_first_demo_run_plans_model_and_data(launch, assets):
    """Invariant: on the demo's first run (no model yet) the missing model and data files pass the checks,
    judged against the demo model's shape; they are built only once processes have started."""
    fresh = assets / "fresh"
    with pytest.raises(ProcessesStarted):
        launch(f"model.hf_path={fresh}/model", f"data.train_files=[{fresh}/train.parquet]",
               f"data.val_files=[{fresh}/test.parquet]")
    assert not fresh.exists()


@pytest.mark.parametrize("overrides, world_size, reason", [
    (["parallel.tensor=3"], 2, "parallel.tensor=3 x parallel.pipeline=1 x parallel.context=1 = 3 does not divide "
                               "the world size 2"),
    (["parallel.tensor=4"], 4, "parallel.tensor=4 does not divide the model's 2 key-value heads"),
    (["parallel.pipeline=3"], 3, "parallel.pipeline=3 does not divide the model's 4 layers"),
    (["data.prompts_per_step=3"], 2, "data.prompts_per_step=3 must be divisible by the data-parallel size 2"),
])
def test_layout_error_prints_every_factor_before_anything_starts(launch, overrides, world_size, reason):
    """Invariant: a layout that cannot run on the launched processes is one line, before processes start,
    listing every factor and the process count, then the factor that does not fit."""
    status, lines = launch(*overrides, world_size=world_size)
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith("config error: parallel layout tensor=") and f"on {world_size} processes: " in lines[0]
    for factor in ("tensor=", "pipeline=", "context=", "expert=", "expert_tensor=", "data="):
        assert f" {factor}" in lines[0]
    assert reason in lines[0]


def test_only_rank_0_prints(launch):
    """Invariant: every rank exits with 2, only global rank 0 prints the line."""
    assert launch("actor.optim.lr=-1", rank=1, world_size=2) == (2, [])
    assert launch("actor.optim.lr=-1", rank=0, world_size=2) == (2, ["config error: actor.optim.lr=-1.0 must be > 0"])


def test_the_real_entry_prints_one_line(tmp_path):
    """Invariant: `python launch/train.py` itself (no stand-ins) gives exactly one stderr line and exit 2 for a
    broken YAML file, on rank 0, and nothing on another rank."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {hf_path: x\n")
    command = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", str(broken)]
    for rank, expected_lines in ((0, 1), (1, 0)):
        environment = dict(os.environ, PYTHONPATH=ROOT, RANK=str(rank), WORLD_SIZE="2")
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == expected_lines, result.stderr
        assert result.stdout == ""
    assert result.stderr == ""


def test_missing_resume_checkpoint_is_named_before_anything_starts(launch, assets):
    """Invariant: trainer.resume naming a directory that does not exist stops the run before processes start."""
    missing = assets / "run" / "checkpoints" / "step_00000009"
    status, lines = launch(f"trainer.resume={missing}")
    assert status == 2 and lines == [f"config error: trainer.resume={missing} is not a checkpoint directory; give "
                                     "one (e.g. RUN/checkpoints/step_N), or auto (the latest, if any) or never"]
