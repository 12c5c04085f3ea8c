"""A user's own advantage estimator and policy loss, registered in a file named in algorithm.plugins, train:
the loop calls them with the registry's signatures and the update steps the actor with their output."""
import math

from tests.cpu_ranks import run_on_cpu_ranks

PLUGIN = '''
import torch

from mmrl_megatron.algorithms import Advantages, ppo_clip_loss, register_advantage_estimator, register_policy_loss

CALLS = []


@register_advantage_estimator("median_baseline", needs=("ref_logprobs",))
def median_baseline(inputs):
    """Score minus the group median, on every response token; records what it was handed."""
    groups = inputs.scores.view(-1, inputs.group_size)
    advantages = (groups - groups.median(dim=1, keepdim=True).values).reshape(-1)
    CALLS.append(("estimator", sorted(inputs.tensors), inputs.scores.clone(), advantages.clone()))
    return Advantages(advantages.unsqueeze(1) * inputs.mask)


@register_policy_loss("recorded_ppo")
def recorded_ppo(logprobs, old_logprobs, advantages, mask, config):
    CALLS.append(("loss", config.clip_low))
    return ppo_clip_loss(logprobs, old_logprobs, advantages, mask, config.clip_low, config.clip_high)
'''


def _train_with_plugin(run_dir, plugin_path):
    """Two steps with the plug-in's estimator and loss; returns what they recorded, the samples' advantages
    (each step's last batch), the metrics and whether the actor's weights moved."""
    import sys

    import torch

    from mmrl_megatron.algorithms.config_check import check_algorithm_config
    from tests.trainer.stand_ins import stand_in_config, stand_in_trainer

    config = stand_in_config(run_dir, [f"algorithm.plugins=[{plugin_path}]", "algorithm.advantage=median_baseline",
                                       "algorithm.policy_loss=recorded_ppo", "algorithm.clip_low=0.15",
                                       "trainer.steps=2", "trainer.save_every=-1"])
    check_algorithm_config(config)  # what training does before it starts: the plug-in registers its names
    trainer = stand_in_trainer(config)
    before = [p.detach().clone() for p in trainer.parts.actor.chunks[0].parameters()]
    stored, compute = [], trainer.compute_advantages

    def keeping(samples):
        stats = compute(samples)
        stored.append([(sample.score, sample.tensors["advantages"].tolist()) for sample in samples])
        return stats

    trainer.compute_advantages = keeping
    metrics = trainer.run()
    trainer.parts.tracker.close()
    moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.parts.actor.chunks[0].parameters()))
    [plugin] = [module for module in sys.modules.values() if getattr(module, "__file__", None) == plugin_path]
    calls = [tuple(x.tolist() if torch.is_tensor(x) else x for x in call) for call in plugin.CALLS]
    return calls, stored, metrics, moved


def test_a_user_registered_estimator_and_loss_train(tmp_path):
    """Invariant: with algorithm.advantage / policy_loss naming a plug-in's registrations, each step calls the
    estimator once (handed the reference log-probs it declared), every sample's advantage is its score minus its
    group's median on each response token (float32, 1e-6), the loss runs with the config's clip_low on every update, and the
    actor's weights move with finite losses."""
    plugin_path = str(tmp_path / "my_algorithms.py")
    with open(plugin_path, "w") as handle:
        handle.write(PLUGIN)
    [(calls, stored, metrics, moved)] = run_on_cpu_ranks(1, _train_with_plugin, str(tmp_path / "run"), plugin_path)
    estimator_calls = [call for call in calls if call[0] == "estimator"]
    assert len(estimator_calls) == 2 and all(call[1] == ["ref_logprobs"] for call in estimator_calls)
    assert {call for call in calls if call[0] == "loss"} == {("loss", 0.15)}
    for step in stored:
        scores = [score for score, _ in step]
        for index, (score, advantages) in enumerate(step):
            group = sorted(scores[index - index % 4:index - index % 4 + 4])  # rollout.n=4; torch's median: lower
            assert advantages and all(math.isclose(value, score - group[1], abs_tol=1e-6) for value in advantages)
    assert moved and math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["actor/grad_norm"])
