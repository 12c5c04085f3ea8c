"""Registries of advantage estimators and policy losses, one signature each, looked up by algorithm.advantage and
algorithm.policy_loss (verl's register_adv_est / register_policy_loss in trainer/ppo/core_algos.py are the model).

An estimator declares what it reads beyond the scores (per-token tensors such as a critic's "old_values";
token rewards that algorithm.kl_in_reward penalises), so the trainer builds a critic, keeps the old-policy
pass and stacks the tensors from the declaration, with no list of algorithm names anywhere else. Users add
their own with the decorators, in a file or module named in algorithm.plugins (README "Your own algorithm").
"""
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

# the per-token [B, L] tensors the trainer can hand an estimator (what the scoring passes of step 4 store)
TOKEN_TENSORS = ("old_logprobs", "ref_logprobs", "old_values")
KL_SHAPING_TENSORS = ("old_logprobs", "ref_logprobs")  # what a KL-penalised token reward is computed from


@dataclass
class AdvantageInputs:
    """What an estimator gets: responses of one prompt are contiguous rows (g*n .. g*n+n-1)."""

    scores: torch.Tensor  # [B] one outcome reward per response
    mask: torch.Tensor  # [B, L] 1 on response tokens
    group_size: int  # n responses per prompt (rollout.n)
    config: Any  # the AlgorithmConfig (gamma, lam, norm_adv_by_std, kl_coef, ...)
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)  # [B, L], the names the estimator declared


@dataclass
class Advantages:
    advantages: torch.Tensor  # [B, L], zero outside the mask
    returns: Optional[torch.Tensor] = None  # [B, L] value targets, for an estimator that trains a critic


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    compute: Callable[[AdvantageInputs], Advantages]
    needs: Tuple[str, ...] = ()  # per-token tensors it reads; "old_values" makes the trainer build a critic
    # reads token rewards (advantages.token_rewards), which algorithm.kl_in_reward penalises with the KL to the
    # reference: the old and reference log-probs are then needed before the update
    token_rewards: bool = False
    # its advantages differ along a response (a critic's baseline per token), which a sequence-level policy loss
    # (GSPO) cannot take
    token_level: bool = False

    @property
    def needs_critic(self) -> bool:
        return "old_values" in self.needs

    def tensors_needed(self, config) -> Tuple[str, ...]:
        """The per-token tensors `compute` reads under this algorithm config."""
        shaped = self.token_rewards and config.kl_in_reward and config.kl_coef > 0
        return tuple(name for name in TOKEN_TENSORS if name in self.needs or (shaped and name in KL_SHAPING_TENSORS))


@dataclass(frozen=True)
class PolicyLoss:
    name: str
    # (logprobs, old_logprobs, advantages, mask, config) -> policy_loss.PolicyLossOutput, tensors [B, L]
    compute: Callable[..., Any]
    sequence_level: bool = False  # one importance ratio per response (GSPO)


ADVANTAGE_ESTIMATORS: Dict[str, AdvantageEstimator] = {}
POLICY_LOSSES: Dict[str, PolicyLoss] = {}


def _add(registry: Dict, kind: str, entry) -> None:
    known = registry.get(entry.name)
    if known is not None and known.compute is not entry.compute:
        raise ValueError(f"{kind} '{entry.name}' is already registered (by {known.compute.__module__}."
                         f"{known.compute.__qualname__}); choose another name")
    registry[entry.name] = entry


def register_advantage_estimator(name: str, needs: Iterable[str] = (), token_rewards: bool = False,
                                 token_level: bool = False) -> Callable:
    """Decorator: `fn(inputs: AdvantageInputs) -> Advantages` becomes algorithm.advantage=<name>."""
    needs = tuple(needs)
    unknown = [tensor for tensor in needs if tensor not in TOKEN_TENSORS]
    if unknown:
        raise ValueError(f"advantage estimator '{name}' needs {unknown}; the trainer provides {list(TOKEN_TENSORS)}")

    def register(fn: Callable[[AdvantageInputs], Advantages]) -> Callable:
        _add(ADVANTAGE_ESTIMATORS, "advantage estimator", AdvantageEstimator(name, fn, needs, token_rewards,
                                                                             token_level))
        return fn

    return register


def register_policy_loss(name: str, sequence_level: bool = False) -> Callable:
    """Decorator: `fn(logprobs, old_logprobs, advantages, mask, config) -> PolicyLossOutput` becomes
    algorithm.policy_loss=<name>."""
    def register(fn: Callable) -> Callable:
        _add(POLICY_LOSSES, "policy loss", PolicyLoss(name, fn, sequence_level))
        return fn

    return register


def _lookup(registry: Dict, kind: str, key: str, name: str):
    if name not in registry:
        raise ValueError(f"{key}={name!r} is not a registered {kind}; registered: {', '.join(registry)} (add one "
                         f"with algorithms.register_{kind.replace(' ', '_')} in a file named in algorithm.plugins)")
    return registry[name]


def advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered as `name`; ValueError listing the registered names otherwise."""
    return _lookup(ADVANTAGE_ESTIMATORS, "advantage estimator", "algorithm.advantage", name)


def policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered as `name`; ValueError listing the registered names otherwise."""
    return _lookup(POLICY_LOSSES, "policy loss", "algorithm.policy_loss", name)


def import_plugins(plugins: Iterable[str]) -> None:
    """Import each "path/to/file.py" or "package.module" (once per process): their decorators register."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = os.path.abspath(plugin)
            module_name = f"mmrl_algorithm_plugin_{abs(hash(path))}"
            if module_name in sys.modules:
                continue
            if not os.path.isfile(path):
                raise ValueError(f"algorithm.plugins: {plugin} does not exist")
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as error:
                del sys.modules[module_name]
                raise ValueError(f"algorithm.plugins: importing {plugin} failed: {error!r}") from error
        else:
            try:
                importlib.import_module(plugin)
            except ImportError as error:
                raise ValueError(f"algorithm.plugins: cannot import module {plugin!r} ({error}); give a module on "
                                 "PYTHONPATH or 'path/to/file.py'") from error
