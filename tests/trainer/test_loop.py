"""The RL loop on 4 CPU ranks at (TP, PP) = (2, 2): GRPO and PPO each run 3 steps with finite losses,
through megatron-core's pipeline schedule, optimizer, checkpoint save and the weight bridge."""
import math

from tests.cpu_ranks import run_on_cpu_ranks

KEYS = ("reward/mean", "loss/policy", "kl/mean", "actor/grad_norm", "actor/entropy",
        "throughput/tokens_per_s_per_gpu", "response/length_mean", "time/update_s", "weight_sync/gigabytes")


def _run_both_algorithms(root):
    import torch.distributed as dist

    from tests.trainer.stand_ins import stand_in_config, stand_in_trainer

    results = {}
    for name, overrides in (("grpo", ["algorithm.advantage=grpo"]),
                            ("ppo", ["algorithm.advantage=gae", "algorithm.loss_agg=seq_mean_token_mean"])):
        config = stand_in_config(f"{root}/{name}", ["parallel.tensor=2", "parallel.pipeline=2"] + overrides)
        trainer = stand_in_trainer(config)
        metrics = trainer.run()
        trainer.parts.tracker.close()
        results[name] = (metrics, trainer.state.step, trainer.parts.sources.engine.updates)
        dist.barrier()
    return results


def test_grpo_and_ppo_three_steps_tp2_pp2(tmp_path):
    """Invariant: both algorithms complete 3 steps at TP=2 x PP=2 with finite losses and gradient norms,
    every rank reports the same metrics, the critic reports value loss, and weights reach the engine."""
    per_rank = run_on_cpu_ranks(4, _run_both_algorithms, str(tmp_path))
    for name in ("grpo", "ppo"):
        metrics, step, updates = per_rank[0][name]
        assert step == 3 and updates > 0
        for key in KEYS:
            assert math.isfinite(metrics[key]), (name, key, metrics.get(key))
        def measured(values):  # everything but wall-clock timings, which are each rank's own
            return {k: v for k, v in values.items() if not k.startswith(("time/", "throughput/", "weight_sync/"))}

        assert all(measured(rank[name][0]) == measured(metrics) for rank in per_rank), "ranks disagree on metrics"
        assert (tmp_path / name / "checkpoints" / "latest").read_text() == "step_00000003"
    ppo = per_rank[0]["ppo"][0]
    assert math.isfinite(ppo["critic/value_loss"]) and math.isfinite(ppo["critic/explained_variance"])
