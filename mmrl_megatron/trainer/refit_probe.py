"""The fixed probe batch that checks a weight sync by behaviour (bridge/refit_check.py), for engines that
cannot return their weights by name (SGLang): a few training prompts, decoded greedily by the engine after
each sync and scored by the actor at temperature 1.

Every rank of a model-parallel group scores the same probe samples (the actor's forward is collective), so
the group takes the responses of its first rank's engine."""
import functools
from typing import List, Sequence

import torch.distributed as dist

from ..bridge.refit_check import RefitProbe
from ..rollout import RolloutRequest
from . import losses
from .batch import Sample, build_micro_batches

PROBE_NAME = "refit_probe_logprobs"


def _first_ranks_results(results: list, group) -> list:
    """The results of the first rank of `group` (the actor's model-parallel group), on every rank of it."""
    if group.size() == 1:
        return results
    shared = [results]
    dist.broadcast_object_list(shared, src=dist.get_global_rank(group, 0), group=group)
    return shared[0]


def build_refit_probe(prompts: Sequence, actor, positions, pack_sequences, token_budget: int) -> RefitProbe:
    """A RefitProbe over `prompts` (data.PromptSample, the same on every rank) scored by the actor role (a
    ModelRole, whose dims say which ranks form its model-parallel group)."""
    requests = [RolloutRequest(prompt_ids=list(p.prompt_ids), pixel_values=p.pixel_values,
                               image_grid_thw=p.image_grid_thw, images=p.images, prompt_text=p.prompt_text,
                               second_per_grid_ts=p.second_per_grid_ts)
                for p in prompts]
    tensor_group = actor.dims.tensor_group

    def actor_logprobs(requests: Sequence[RolloutRequest], results: Sequence) -> List:
        samples = []
        for result in results:
            request = requests[result.request_index]
            samples.append(Sample(prompt_ids=list(request.prompt_ids), response_ids=list(result.response_ids),
                                  group=result.request_index, pixel_values=request.pixel_values,
                                  image_grid_thw=request.image_grid_thw,
                                  position_ids=positions(request.prompt_ids, len(result.response_ids),
                                                         request.image_grid_thw, request.second_per_grid_ts)))
        micro_batches = build_micro_batches(samples, token_budget, pack_sequences)
        actor.score(micro_batches, lambda output, mb: losses.response_logprobs(output, mb, 1.0, tensor_group),
                    PROBE_NAME)
        return [sample.tensors[PROBE_NAME] for sample in samples]

    return RefitProbe(requests, actor_logprobs,
                      share=functools.partial(_first_ranks_results, group=actor.dims.model_parallel_group))
