"""KL estimators between the policy and the frozen reference, per token (Schulman's k1, k2, k3)."""
import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
K3_LIMIT = 10.0  # verl's low_var_kl bound: keeps one wild token from dominating the loss


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """k1 = log p - log q; k2 = (log p - log q)^2 / 2; k3 = exp(log q - log p) - (log q - log p) - 1 in [-10, 10]."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        reverse = -log_ratio
        return (torch.exp(reverse) - reverse - 1.0).clamp(-K3_LIMIT, K3_LIMIT)
    raise ValueError(f"unknown KL estimator '{estimator}'; choose one of {KL_ESTIMATORS}")


def kl_penalised_rewards(token_rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, coefficient: float, estimator: str = "k1") -> torch.Tensor:
    """Token rewards minus coefficient * KL on every response token (KL as a reward penalty)."""
    return (token_rewards - coefficient * kl_penalty(logprobs, ref_logprobs, estimator)) * mask
