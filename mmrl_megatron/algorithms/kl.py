"""KL estimators between the policy and the frozen reference, per token (Schulman's k1, k2, k3)."""
import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
K3_LIMIT = 10.0  # verl's low_var_kl bound: keeps one wild token from dominating the loss
# verl's bound on log q - log p before exp: exp(89) overflows float32, and the gradient of the clamped k3
# would then be 0 * inf = NaN for the whole logit tensor (and a -inf log-prob would give inf - inf).
K3_LOG_RATIO_LIMIT = 20.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """k1 = log p - log q; k2 = (log p - log q)^2 / 2; k3 = exp(d) - d - 1 in [-10, 10] with
    d = log q - log p clamped to [-20, 20]."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        reverse = (-log_ratio).clamp(-K3_LOG_RATIO_LIMIT, K3_LOG_RATIO_LIMIT)
        return (torch.exp(reverse) - reverse - 1.0).clamp(-K3_LIMIT, K3_LIMIT)
    raise ValueError(f"unknown KL estimator '{estimator}'; choose one of {KL_ESTIMATORS}")


def kl_penalised_rewards(token_rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, coefficient: float, estimator: str = "k1") -> torch.Tensor:
    """Token rewards minus coefficient * KL on every response token (KL as a reward penalty)."""
    return (token_rewards - coefficient * kl_penalty(logprobs, ref_logprobs, estimator)) * mask
