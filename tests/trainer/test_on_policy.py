"""An on-policy update (one epoch, one mini-batch) skips the old-policy scoring pass: its log-probs are the
update's own, detached. The step must train exactly as with the pass, and report the same metrics."""
import torch

from tests.cpu_ranks import run_on_cpu_ranks


def _one_step(root: str):
    """(metrics, old log-probs, actor weights, scoring passes by name) for one GRPO step with and without the
    skip, from the same seed; as lists (tensors do not outlive the rank's process)."""
    from mmrl_megatron.trainer import roles
    from tests.trainer.stand_ins import stand_in_config, stand_in_trainer

    results = {}
    for mode in ("skipped", "scored"):
        config = stand_in_config(f"{root}/{mode}", ["actor.mini_batches_per_step=1", "actor.ppo_epochs=1"])
        trainer = stand_in_trainer(config)
        if mode == "scored":
            trainer.on_policy_update = lambda samples: False
        passes = []
        score = roles.ModelRole.score

        def counting_score(self, micro_batches, score_fn, name, passes=passes, score=score):
            passes.append(name)
            return score(self, micro_batches, score_fn, name)

        roles.ModelRole.score = counting_score
        kept = {}
        update = trainer.update

        def update_and_keep(samples, step, on_policy, update=update):
            stats = update(samples, step, on_policy)
            kept["old_logprobs"] = [sample.tensors["old_logprobs"].tolist() for sample in samples]
            return stats

        trainer.update = update_and_keep
        try:
            metrics = trainer.train_step(1)
        finally:
            roles.ModelRole.score = score
        weights = [p.detach().flatten().tolist() for p in trainer.parts.actor.chunks[0].parameters()]
        results[mode] = (metrics, kept["old_logprobs"], weights, passes)
        trainer.parts.tracker.close()
    return results


def test_on_policy_update_skips_the_old_policy_pass_and_trains_the_same(tmp_path):
    """Invariant (issue 15): with one epoch and one mini-batch no old-policy pass runs (only the reference
    scores), yet the updated weights, the stored old log-probs and the step's metrics equal those of a step that
    ran the pass (fp32, 1e-6)."""
    [results] = run_on_cpu_ranks(1, _one_step, str(tmp_path))
    skipped_metrics, skipped_old, skipped_weights, skipped_passes = results["skipped"]
    scored_metrics, scored_old, scored_weights, scored_passes = results["scored"]
    assert skipped_passes == ["ref_logprobs"] and scored_passes == ["old_logprobs", "ref_logprobs"]
    for mine, reference in zip(skipped_old + skipped_weights, scored_old + scored_weights):
        assert torch.allclose(torch.tensor(mine), torch.tensor(reference), atol=1e-6)
    for key in ("loss/policy", "kl/mean", "actor/entropy", "actor/grad_norm", "rollout/logprob_abs_diff",
                "rollout/logprob_abs_diff_max", "reward/mean"):
        assert abs(skipped_metrics[key] - scored_metrics[key]) <= 1e-6 * max(1.0, abs(scored_metrics[key])), key
