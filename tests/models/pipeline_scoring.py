"""What the parity tests share: a checkpoint's config.json, next-token labels, and per-token log-probs through
megatron-core's pipeline schedule (forward only), as the trainer's scoring pass runs it."""
import json
import os

import torch


def hf_config_of(hf_dir: str) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as handle:
        return json.load(handle)


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """[B, S] labels: the next token at each position, 0 at the last (its log-prob is never read)."""
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    return labels


def pipeline_logprobs(model, dims, inputs, labels, seq_length: int, micro_batch_size: int):
    """[B, S] log-probs of `labels` on the last pipeline stage (None elsewhere), via megatron's schedule;
    `dims`: the started parallel.ParallelDims the model was built under."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mmrl_megatron.models.common.logprobs import vocab_parallel_logprobs

    def forward_step(data_iterator, model):
        output = model(*next(data_iterator))

        def loss(logits):
            logprobs = vocab_parallel_logprobs(logits, labels, group=dims.tensor_group)
            return logprobs.sum() * 0, {"logprobs": logprobs.detach()}

        return output, loss

    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([inputs]), model=[model], num_microbatches=1,
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)
    return stored[0]["logprobs"] if dims.is_last_stage else None
