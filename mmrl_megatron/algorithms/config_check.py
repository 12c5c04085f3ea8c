"""The algorithm section of a run's config against the registries: checked here, above config, because the
registries are this package's (config/ sits below every package and imports none of them)."""
from ..config.errors import ConfigError


def check_algorithm_config(config) -> None:
    """algorithm.plugins import, algorithm.advantage and algorithm.policy_loss name registered algorithms, and
    the two fit together and with algorithm.kl_in_reward, as the estimator and the loss declare; ConfigError
    (listing the registered names) otherwise. Called on every rank before training starts (trainer/run.py), so
    each rank has imported the plug-ins before it builds the loop. `config` is config.Config."""
    import mmrl_megatron.algorithms as algorithms

    algorithm = config.algorithm
    try:
        algorithms.import_plugins(algorithm.plugins)
        estimator = algorithms.advantage_estimator(algorithm.advantage)
        loss = algorithms.policy_loss(algorithm.policy_loss)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if loss.sequence_level and estimator.token_level:
        raise ConfigError(f"algorithm.policy_loss={loss.name} uses sequence-level ratios and cannot take the "
                          f"token-level advantages of algorithm.advantage={estimator.name}; use policy_loss=ppo")
    if "ref_logprobs" in estimator.needs and algorithm.kl_coef == 0:
        raise ConfigError(f"algorithm.advantage={estimator.name} reads the reference log-probs, which only a run with a "
                          "reference model has; set algorithm.kl_coef > 0")
    if algorithm.kl_in_reward and algorithm.kl_coef > 0 and not estimator.token_rewards:
        shaping = [name for name, known in algorithms.ADVANTAGE_ESTIMATORS.items() if known.token_rewards]
        raise ConfigError(f"algorithm.kl_in_reward=true: algorithm.advantage={estimator.name} reads no token rewards "
                          f"for the KL penalty to shape; set kl_in_reward=false (the KL becomes a loss term) or "
                          f"use an estimator that reads them: {', '.join(shaping)}")
