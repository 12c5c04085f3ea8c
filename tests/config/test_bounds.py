"""Range checks on config values (config/bounds.py): out-of-range values fail at load time, naming the key."""
import glob
import os

import pytest
import yaml

from mmrl_megatron.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("override, message", [
    ("actor.optim.lr=-1", "actor.optim.lr=-1.0 must be > 0"),
    ("actor.optim.lr=nan", "actor.optim.lr=nan must be a finite number"),
    ("critic.optim.adam_beta2=1.0", "critic.optim.adam_beta2=1.0 must be in [0, 1)"),
    ("actor.ppo_epochs=0", "actor.ppo_epochs=0 must be >= 1"),
    ("rollout.n=-2", "rollout.n=-2 must be >= 1"),
    ("rollout.temperature=-0.5", "rollout.temperature=-0.5 must be >= 0"),
    ("rollout.top_p=0", "rollout.top_p=0.0 must be in (0, 1]"),
    ("rollout.top_k=0", "rollout.top_k=0 must be -1 or >= 1"),
    ("rollout.sglang.mem_fraction_static=1.5", "rollout.sglang.mem_fraction_static=1.5 must be in (0, 1]"),
    ("algorithm.gamma=1.1", "algorithm.gamma=1.1 must be in [0, 1]"),
    ("algorithm.dual_clip=0.5", "algorithm.dual_clip=0.5 must be > 1"),
    ("algorithm.entropy_coef=-0.01", "algorithm.entropy_coef=-0.01 must be >= 0"),
    ("data.prompts_per_step=0", "data.prompts_per_step=0 must be >= 1"),
    ("data.augment.crop_fraction=1", "data.augment.crop_fraction=1.0 must be in [0, 1)"),
    ("parallel.tensor=0", "parallel.tensor=0 must be >= 1"),
    ("trainer.save_every=-2", "trainer.save_every=-2 must be -1 or >= 0"),
    ("reward.timeout_s=0", "reward.timeout_s=0.0 must be > 0"),
])
def test_out_of_range_value_is_named(override, message):
    """Invariant: a value outside its range (sizes below 1, probabilities outside [0, 1], non-finite floats, a
    negative learning rate) fails while the config loads, with key=value and the allowed range."""
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value) == message


@pytest.mark.parametrize("override", ["rollout.top_k=-1", "rollout.top_k=5", "trainer.save_every=-1",
                                      "trainer.save_every=0", "algorithm.dual_clip=null", "algorithm.gamma=1"])
def test_documented_special_and_edge_values_are_accepted(override):
    """Invariant: values the schema gives a meaning (-1: off or never; null: disabled) and the range's own
    edges still load."""
    config = load_config(None, [override])
    key, _, text = override.partition("=")
    *parents, leaf = key.split(".")
    for name in parents:
        config = getattr(config, name)
    assert getattr(config, leaf) == yaml.safe_load(text)


def test_every_problem_is_listed_in_one_message():
    """Invariant: several bad values are reported together, so one relaunch fixes them all."""
    with pytest.raises(ConfigError) as error:
        load_config(None, ["actor.optim.lr=-1", "rollout.n=0"])
    assert str(error.value) == "rollout.n=0 must be >= 1; actor.optim.lr=-1.0 must be > 0"  # schema order


@pytest.mark.parametrize("overrides, message", [
    (["actor.optim.min_lr=1e-3"], "actor.optim.min_lr=0.001 must not exceed actor.optim.lr=1e-06"),
    (["data.min_pixels=10000", "data.max_pixels=5000"], "data.min_pixels=10000 must not exceed data.max_pixels=5000"),
])
def test_values_that_cannot_hold_together_are_named(overrides, message):
    """Invariant: pairs each in range but contradictory (min above max) fail at load time naming both keys."""
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert str(error.value) == message


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "yaml_configs", "*.yaml"))))
def test_shipped_configs_are_in_range(path):
    """Invariant: every config the project ships passes the range checks."""
    load_config(path)
