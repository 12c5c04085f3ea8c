"""Before RL: the supervised warm-up on ground-truth answers (held-out evaluation: evaluation.py)."""
import logging
from typing import Callable, Dict, Iterable, Iterator, List

from .batch import Sample, build_micro_batches
from .losses import Normaliser, supervised_loss
from .metrics import reduce_across_ranks

logger = logging.getLogger(__name__)


def supervised_samples(prompts, encode: Callable[[str], List[int]], template: str, end_ids: List[int],
                       positions: Callable) -> List[Sample]:
    """One Sample per prompt whose response is template.format(answer=ground truth) + the end-of-turn ids."""
    samples = []
    for index, prompt in enumerate(prompts):
        response = encode(template.format(answer=prompt.ground_truth)) + list(end_ids)
        sample = Sample(prompt_ids=list(prompt.prompt_ids), response_ids=response, group=index,
                        pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
        sample.position_ids = positions(sample.prompt_ids, len(response), prompt.image_grid_thw,
                                        prompt.second_per_grid_ts)
        samples.append(sample)
    return samples


def supervised_warmup(actor, prompts: Iterator, steps: int, lr: float, grad_clip: float, token_budget: int,
                      pack_sequences: Callable, make_samples: Callable, normaliser: Callable[[List[Sample]], Normaliser],
                      progress: Callable[[Iterable, str], Iterable]) -> Dict[str, float]:
    """`steps` optimizer steps of next-token loss on ground-truth answers; returns the last step's mean loss."""
    last = {}
    for step in progress(range(steps), "supervised warm-up"):
        samples = make_samples(next(prompts))
        micro_batches = build_micro_batches(samples, token_budget, pack_sequences)
        norm = normaliser(samples)
        stats, grad_norm, _ = actor.train_step(
            micro_batches, lambda output, mb: supervised_loss(output, mb, norm, actor.dims.tensor_group), grad_clip,
            lr_override=lr)
        last = reduce_across_ranks(stats, {})
        if step % 10 == 0 or step == steps - 1:
            logger.info("warm-up step %d/%d: loss %.4f", step + 1, steps, last.get("loss/sft", float("nan")))
    actor.restore_scheduled_lr()
    return {"warmup/sft_loss": last.get("loss/sft", float("nan"))}

