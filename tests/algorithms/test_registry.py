"""The registries of advantage estimators and policy losses: built-ins behind one signature compute what the
pure functions do, declarations say which per-token tensors the trainer must provide, names are unique, and
config validation accepts exactly the registered names (a plug-in's included)."""
from types import SimpleNamespace

import pytest
import torch

from mmrl_megatron import algorithms
from mmrl_megatron.algorithms.config_check import check_algorithm_config
from mmrl_megatron.config import ConfigError, load_config
from mmrl_megatron.config.schema import AlgorithmConfig


@pytest.fixture
def restored_registries():
    """Leave the registries as they were: a plug-in's names must not reach the other tests' messages."""
    saved = [(registry, dict(registry)) for registry in (algorithms.ADVANTAGE_ESTIMATORS, algorithms.POLICY_LOSSES)]
    yield
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)


def _inputs(config, tensors=()):
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    scores = torch.rand(4, generator=generator)
    per_token = {name: torch.randn(4, 4, generator=generator) * mask for name in tensors}
    return algorithms.AdvantageInputs(scores=scores, mask=mask, group_size=2, config=config, tensors=per_token)


def test_registered_estimators_compute_what_the_pure_functions_do():
    """Invariant: each built-in estimator, called through the registry, equals its pure function on the same
    inputs (GRPO/RLOO broadcast over the response; GAE from the values, with returns; REINFORCE++ with the KL
    penalty folded into the token rewards when kl_in_reward)."""
    config = AlgorithmConfig(gamma=0.9, lam=0.8, kl_coef=0.1, kl_in_reward=True, kl_estimator="k1")
    inputs = _inputs(config, ("old_logprobs", "ref_logprobs", "old_values"))
    mask, scores = inputs.mask, inputs.scores
    grpo = algorithms.advantage_estimator("grpo").compute(inputs)
    assert torch.equal(grpo.advantages, algorithms.grpo_advantages(scores, 2).unsqueeze(1) * mask)
    assert grpo.returns is None
    rloo = algorithms.advantage_estimator("rloo").compute(inputs)
    assert torch.equal(rloo.advantages, algorithms.rloo_advantages(scores, 2).unsqueeze(1) * mask)
    shaped = algorithms.kl_penalised_rewards(algorithms.outcome_to_token_rewards(scores, mask),
                                             inputs.tensors["old_logprobs"], inputs.tensors["ref_logprobs"], mask,
                                             0.1, "k1")
    reinforce = algorithms.advantage_estimator("reinforce_plus_plus").compute(inputs)
    assert torch.equal(reinforce.advantages, algorithms.reinforce_plus_plus_advantages(shaped, mask, 0.9))
    gae = algorithms.advantage_estimator("gae").compute(inputs)
    advantages, returns = algorithms.gae_advantages(shaped, inputs.tensors["old_values"], mask, 0.9, 0.8)
    assert torch.equal(gae.advantages, advantages) and torch.equal(gae.returns, returns)


@pytest.mark.parametrize("name, kl_in_reward, kl_coef, expected", [
    ("grpo", False, 0.1, ()),
    ("rloo", False, 0.0, ()),
    ("reinforce_plus_plus", False, 0.1, ()),
    ("reinforce_plus_plus", True, 0.1, ("old_logprobs", "ref_logprobs")),
    ("reinforce_plus_plus", True, 0.0, ()),  # no reference model, nothing to penalise
    ("gae", False, 0.0, ("old_values",)),
    ("gae", True, 0.1, ("old_logprobs", "ref_logprobs", "old_values")),
])
def test_declarations_give_the_tensors_the_trainer_provides(name, kl_in_reward, kl_coef, expected):
    """Invariant: the per-token tensors an estimator reads follow from its declaration and the config: a critic's
    values for GAE alone, the old and reference log-probs only when kl_in_reward shapes its token rewards."""
    estimator = algorithms.advantage_estimator(name)
    config = AlgorithmConfig(kl_in_reward=kl_in_reward, kl_coef=kl_coef)
    assert estimator.tensors_needed(config) == expected
    assert estimator.needs_critic == (name == "gae")


def test_registered_policy_losses_read_the_clip_bounds_from_the_config():
    """Invariant: ppo and gspo through the registry equal ppo_clip_loss / gspo_loss with the config's clip_low,
    clip_high and dual_clip; gspo alone declares sequence-level ratios."""
    generator = torch.Generator().manual_seed(1)
    new, old = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    advantages, mask = torch.randn(3, 5, generator=generator), (torch.rand(3, 5, generator=generator) > 0.3).float()
    config = AlgorithmConfig(clip_low=0.1, clip_high=0.3, dual_clip=2.5)
    for name, pure in (("ppo", algorithms.ppo_clip_loss), ("gspo", algorithms.gspo_loss)):
        registered = algorithms.policy_loss(name)
        mine = registered.compute(new, old, advantages, mask, config)
        theirs = pure(new, old, advantages, mask, 0.1, 0.3, 2.5)
        assert torch.equal(mine.per_token_loss, theirs.per_token_loss) and torch.equal(mine.ratio_mean,
                                                                                       theirs.ratio_mean)
        assert registered.sequence_level == (name == "gspo")


def test_a_name_is_registered_once_and_needs_are_checked(restored_registries):
    """Invariant: registering another function under a taken name, or declaring a tensor the trainer does not
    provide, fails at registration naming the estimator; re-registering the same function is harmless."""
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        algorithms.register_advantage_estimator("grpo")(lambda inputs: None)
    with pytest.raises(ValueError, match="'ppo' is already registered"):
        algorithms.register_policy_loss("ppo")(lambda *args: None)
    with pytest.raises(ValueError, match=r"'mine' needs \['rewards'\]"):
        algorithms.register_advantage_estimator("mine", needs=("rewards",))
    grpo = algorithms.advantage_estimator("grpo")
    algorithms.register_advantage_estimator("grpo")(grpo.compute)
    assert algorithms.advantage_estimator("grpo") == grpo


PLUGIN = '''
from mmrl_megatron.algorithms import Advantages, register_advantage_estimator, register_policy_loss


@register_advantage_estimator("plugin_baseline_{tag}", needs=("ref_logprobs",))
def baseline(inputs):
    return Advantages(inputs.scores.unsqueeze(1) * inputs.mask)


@register_policy_loss("plugin_loss_{tag}", sequence_level=True)
def loss(logprobs, old_logprobs, advantages, mask, config):
    raise NotImplementedError
'''


def checked(overrides):
    """The config with those overrides, as training checks it before it starts."""
    config = load_config(None, overrides)
    check_algorithm_config(config)
    return config


def test_config_accepts_the_registered_names_and_a_plugin_adds_its_own(tmp_path, restored_registries):
    """Invariant: algorithm.advantage / policy_loss must be registered names: an unknown one is one ConfigError
    listing the registered ones; a file in algorithm.plugins registers its own, which the config then accepts
    (and lists); the estimator's declarations are checked against the rest of the config."""
    with pytest.raises(ConfigError) as error:
        checked(["algorithm.advantage=plugin_baseline_a"])
    assert "registered: grpo, rloo, reinforce_plus_plus, gae" in str(error.value)
    plugin = tmp_path / "my_algorithms.py"
    plugin.write_text(PLUGIN.format(tag="a"))
    with_plugin = [f"algorithm.plugins=[{plugin}]", "algorithm.kl_coef=0.1"]
    config = checked(with_plugin + ["algorithm.advantage=plugin_baseline_a",
                                              "algorithm.policy_loss=plugin_loss_a"])
    assert (config.algorithm.advantage, config.algorithm.policy_loss) == ("plugin_baseline_a", "plugin_loss_a")
    with pytest.raises(ConfigError, match="registered: ppo, gspo, plugin_loss_a"):
        checked(with_plugin + ["algorithm.policy_loss=plugin_loss_b"])
    with pytest.raises(ConfigError, match="reads the reference log-probs.*kl_coef > 0"):
        checked(with_plugin + ["algorithm.advantage=plugin_baseline_a", "algorithm.kl_coef=0"])
    with pytest.raises(ConfigError, match="policy_loss=plugin_loss_a uses sequence-level ratios.*advantage=gae"):
        checked(with_plugin + ["algorithm.advantage=gae", "algorithm.policy_loss=plugin_loss_a"])
    with pytest.raises(ConfigError, match="kl_in_reward=true: algorithm.advantage=grpo reads no token rewards"):
        checked(["algorithm.kl_in_reward=true", "algorithm.kl_coef=0.1"])
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no')\n")
    with pytest.raises(ConfigError, match=f"algorithm.plugins: importing {broken} failed: RuntimeError"):
        checked([f"algorithm.plugins=[{broken}]"])
