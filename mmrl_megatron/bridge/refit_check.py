"""Verify a weight sync by behaviour: the engine's log-probs of a fixed probe batch against the actor's.

For engines that cannot return their tensors by name (SGLang 0.5.23 has no get_weights_by_name for
Qwen2.5-VL or Kimi-VL). The names are checked before sending (SGLang: against the served
checkpoint), so what remains to catch is an engine holding other weights than the actor: a transform
wrong in convert/, a tensor the engine dropped, a server that came back with its checkpoint's weights.
The engine decodes the probe greedily (its log-probs are then at temperature 1) and the actor scores
the same tokens at temperature 1; a mean difference above `tolerance` nats per token fails.
"""
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from ..rollout.engine import RolloutEngine
from ..rollout.types import RolloutRequest, RolloutResult, SamplingParams
from .errors import BridgeError

ActorLogprobs = Callable[[Sequence[RolloutRequest], Sequence[RolloutResult]], List[torch.Tensor]]


@dataclass
class RefitProbe:
    """requests: a fixed batch (the same every step, so the check is comparable over a run).
    actor_logprobs(requests, results): the actor's log-prob of each result's response tokens at
    temperature 1, one 1-D tensor per result (a forward pass, collective over the actor's ranks: it
    must score the same samples on every rank of a model-parallel group, so gather the results over
    that group first where its ranks talk to different servers, as trainer/experience.py does).
    tolerance: mean |engine - actor| per token; bf16 engines differ from the actor by about 1e-2.
    share(results): the results every rank compares (default its own; the trainer gives each
    model-parallel group its first rank's, so all of them score and judge the same samples)."""

    requests: List[RolloutRequest]
    actor_logprobs: ActorLogprobs
    max_new_tokens: int = 8
    tolerance: float = 0.05
    share: Callable[[List[RolloutResult]], List[RolloutResult]] = list


def check_refit(engine: RolloutEngine, probe: RefitProbe) -> float:
    """The mean per-token log-prob difference; BridgeError above the tolerance (collective)."""
    # eos ignored: every probe response has max_new_tokens tokens, none is empty
    results = probe.share(engine.generate(probe.requests, SamplingParams(
        n=1, temperature=0.0, max_new_tokens=probe.max_new_tokens, ignore_eos=True)))
    actor = probe.actor_logprobs(probe.requests, results)
    engine_logprobs = torch.cat([torch.tensor(result.logprobs, dtype=torch.float64) for result in results])
    actor_logprobs = torch.cat([logprobs.detach().to("cpu", torch.float64).reshape(-1) for logprobs in actor])
    if engine_logprobs.numel() != actor_logprobs.numel():
        raise BridgeError(f"refit check: the actor scored {actor_logprobs.numel()} probe tokens, the engine "
                          f"generated {engine_logprobs.numel()}")
    difference = float((engine_logprobs - actor_logprobs).abs().mean()) if engine_logprobs.numel() else 0.0
    if not difference <= probe.tolerance:
        raise BridgeError(
            f"after the weight sync the engine's log-probs of the probe batch differ from the actor's by {difference:.4f} "
            f"nats per token on average (tolerance {probe.tolerance}): the engine holds other weights than the actor; "
            "check the convert/ rules for the model, and the engine's log for skipped tensors"
        )
    return difference
