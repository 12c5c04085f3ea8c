"""Steps 1-3 of a training step: take prompts, generate n responses each, score them, with DAPO's
dynamic sampling (drop groups whose rewards are all equal and refill) when configured.

With rollout.multi_turn.environment set, the multi-turn driver (rollout/multi_turn.py) generates instead of a
single engine.generate call; each Sample then holds the whole trajectory after the prompt, a loss mask over it
and every image of the conversation, and the reward reads the whole trajectory's text (assistant and
environment turns, decoded as verl's solution_str is).

Within a model-parallel group (the ranks that share one data-parallel rank's prompts) each rank
generates and scores a contiguous share of the prompts with its own engine and the shares are
all-gathered, so every GPU generates and every rank ends with the same samples in the same order.
"""
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import algorithms
from ..rewards import RewardItem
from ..rollout import RolloutRequest, SamplingParams
from .batch import Sample
from .positions import trajectory_positions


@dataclass
class ExperienceSources:
    """What steps 1-3 need: the prompt stream, engine, reward function, tokenizer, position rule, and the
    layout (parallel.ParallelDims, started: which ranks share this rank's prompts)."""

    prompts: Iterator[list]  # yields lists of data.PromptSample for this data-parallel rank
    engine: object  # rollout.RolloutEngine
    reward: object  # rewards.RewardFunction (score_batch)
    decode: Callable[[List[int]], str]
    # (prompt ids, response length, image_grid_thw, second_per_grid_ts) -> [3, P + R] positions
    # (trainer.build.position_rule)
    positions: Callable[..., torch.Tensor]
    dims: object
    multi_turn: Optional[object] = None  # rollout.multi_turn.MultiTurnRollout; None: one assistant turn


def model_parallel_share(count: int, dims) -> range:
    """This rank's contiguous slice of `count` items among the ranks of its model-parallel group."""
    group = dims.model_parallel_group
    size, rank = group.size(), group.rank()
    per_rank, extra = divmod(count, size)
    start = rank * per_rank + min(rank, extra)
    return range(start, start + per_rank + (rank < extra))


def _gather_over_model_parallel(items: list, dims) -> list:
    group = dims.model_parallel_group
    if group.size() == 1:
        return items
    gathered = [None] * group.size()
    dist.all_gather_object(gathered, items, group=group)
    return [item for share in gathered for item in share]


def generate_and_score(prompts: Sequence, sources: ExperienceSources, sampling: SamplingParams,
                       overlong_buffer: int, overlong_penalty: float, group_offset: int = 0) -> List[Sample]:
    """n scored Samples per prompt, ordered by (prompt, sample); identical on all ranks of a model-parallel group."""
    share = model_parallel_share(len(prompts), sources.dims)
    mine = [prompts[i] for i in share]
    requests = [RolloutRequest(prompt_ids=p.prompt_ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                               images=p.images, prompt_text=p.prompt_text, second_per_grid_ts=p.second_per_grid_ts)
                for p in mine]
    if sources.multi_turn is not None:  # called even with no requests: its engine calls must stay in step
        results = sources.multi_turn.generate(mine, requests, sampling)
    else:
        results = sources.engine.generate(requests, sampling) if requests else []
    texts = [sources.decode(r.response_ids) for r in results]
    # the prompt's chat and images travel with each response: a reward model judges them together
    answered = [mine[r.request_index] for r in results]
    items = [RewardItem(p.data_source, text, p.ground_truth, p.extra_info, p.messages, p.images)
             for p, text in zip(answered, texts)]
    scored = sources.reward.score_batch(items) if items else []
    records = [(share.start + r.request_index, r.sample_index, list(r.response_ids), list(r.logprobs), r.finish_reason,
                s.score, s.accuracy, r.turns) for r, s in zip(results, scored)]
    records = sorted(_gather_over_model_parallel(records, sources.dims), key=lambda record: record[:2])
    samples = []
    for prompt_index, _, response_ids, logprobs, finish_reason, score, accuracy, turns in records:
        prompt = prompts[prompt_index]
        sample = Sample(prompt_ids=list(prompt.prompt_ids), response_ids=response_ids,
                        group=group_offset + prompt_index, rollout_logprobs=logprobs,
                        pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                        finish_reason=finish_reason, score=float(score), accuracy=float(accuracy))
        if turns is None:
            sample.position_ids = sources.positions(sample.prompt_ids, len(response_ids), prompt.image_grid_thw,
                                                    prompt.second_per_grid_ts)
        else:
            add_turns(sample, turns, sources.positions, prompt.second_per_grid_ts)
        samples.append(sample)
    if overlong_buffer > 0:
        lengths = torch.tensor([len(s.response_ids) for s in samples])
        shaping = algorithms.overlong_reward_penalty(lengths, sampling.max_new_tokens, overlong_buffer, overlong_penalty)
        for sample, penalty in zip(samples, shaping.tolist()):
            sample.score += penalty
    return samples


def add_turns(sample: Sample, turns, positions: Callable, second_per_grid_ts: Sequence[float] = ()) -> None:
    """Give a multi-turn sample its loss mask, the environment's images after the prompt's, and positions over
    the whole conversation (turns: its rollout.multi_turn.TurnRecord; second_per_grid_ts: the prompt's videos)."""
    sample.loss_mask = turns.loss_mask
    sample.position_ids = trajectory_positions(positions, sample.prompt_ids, sample.image_grid_thw, turns,
                                               second_per_grid_ts)
    sample.pixel_values, sample.image_grid_thw = turns.conversation_images(sample.pixel_values, sample.image_grid_thw)


def keep_informative_groups(samples: List[Sample], group_size: int) -> List[Sample]:
    """Drop every prompt whose n rewards are all equal (DAPO dynamic sampling)."""
    if not samples:
        return samples
    keep = algorithms.groups_with_reward_variance(torch.tensor([s.score for s in samples]), group_size)
    return [s for index, s in enumerate(samples) if keep[index // group_size]]


def collect_experience(sources: ExperienceSources, sampling: SamplingParams, dynamic_sampling: bool,
                       max_refill_rounds: int, overlong_buffer: int, overlong_penalty: float):
    """Steps 1-3. Returns (samples, every reward before filtering, prompts drawn)."""
    prompts = next(sources.prompts)
    wanted = len(prompts)
    samples = generate_and_score(prompts, sources, sampling, overlong_buffer, overlong_penalty)
    all_scores = [s.score for s in samples]
    if not dynamic_sampling:
        return samples, all_scores, len(prompts)
    kept = keep_informative_groups(samples, sampling.n)
    used = len(prompts)
    for round_number in range(max_refill_rounds):
        if len(kept) >= wanted * sampling.n:
            break
        more = next(sources.prompts)
        fresh_sampling = SamplingParams(**{**sampling.__dict__, "seed": (sampling.seed or 0) + round_number + 1})
        extra = generate_and_score(more, sources, fresh_sampling, overlong_buffer, overlong_penalty, group_offset=used)
        all_scores += [s.score for s in extra]
        kept += keep_informative_groups(extra, sampling.n)
        used += len(more)
    # a rank left with nothing still trains on its zero-advantage samples: every data-parallel rank must
    # join the gradient all-reduce
    return kept[:wanted * sampling.n] or samples, all_scores, used
