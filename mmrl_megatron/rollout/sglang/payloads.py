"""Request bodies for SGLang's routes, and /generate answers parsed into RolloutResult.

Generation sends one /generate request per prompt with `n` samples (SGLang expands it and returns
the n answers in order); the prompt goes as `input_ids` (image pads expanded; SGLang collapses them
and re-runs its own image processor, so its preprocessor_config must match ours) plus the encoded
images as base64 data URLs.

Log-probs: SGLang returns log softmax(logits / temperature) for each sampled token (layers/sampler.py),
which is what RolloutResult.logprobs promises ("under the sampling temperature"); the trainer divides
its logits by the same temperature. Temperature 0 is greedy decoding, which SGLang runs as
temperature 1 with top_k 1 (sampling_params.py), so greedy log-probs are at temperature 1. The launcher
removes SGLANG_RETURN_ORIGINAL_LOGPROB from the server's environment, which would undo this.
"""
import base64
import dataclasses
from typing import Any, List, Mapping, Sequence, Tuple

import torch

from ..errors import RolloutError
from ..types import RolloutRequest, RolloutResult, SamplingParams
from .protocol import DEFAULT_WEIGHT_UPDATE_GROUP, FLATTENED_BUCKET_FORMAT

_IMAGE_MIME = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif", b"RIFF": "image/webp"}


def image_data_url(encoded_image: bytes) -> str:
    """A `data:<mime>;base64,...` URL, one of the image forms SGLang's load_image accepts."""
    mime = next((kind for magic, kind in _IMAGE_MIME.items() if encoded_image.startswith(magic)), "image/png")
    return f"data:{mime};base64,{base64.b64encode(encoded_image).decode('ascii')}"


def sampling_params_payload(sampling: SamplingParams) -> dict:
    params = {
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
        # keep special tokens and stop strings in the text; token ids are what we train on anyway
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if sampling.stop_token_ids:
        params["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
    return params


def generate_payload(request: RolloutRequest, sampling: SamplingParams, rid: str) -> dict:
    """The /generate body for one prompt and its n samples."""
    if request.second_per_grid_ts:  # SGLang would sample and size the frames itself, unlike the trainer
        raise RolloutError("video prompts run on the embedded engine only (rollout.backend=embedded): the SGLang "
                           "backend does not send videos")
    payload = {
        "rid": rid,
        "input_ids": list(request.prompt_ids),
        "sampling_params": sampling_params_payload(sampling if request.max_new_tokens is None else
                                                   dataclasses.replace(sampling, max_new_tokens=request.max_new_tokens)),
        "return_logprob": True,
        "logprob_start_len": -1,  # output tokens only
    }
    if request.images:
        payload["image_data"] = [image_data_url(image) for image in request.images]
    return payload


def _finish_reason(meta_info: Mapping) -> str:
    reason = meta_info.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, Mapping) else reason
    if kind not in ("stop", "length", "abort"):
        raise RolloutError(f"SGLang answered an unknown finish_reason {reason!r} (meta_info {dict(meta_info)})")
    return kind


def parse_generate_answer(answer: Any, request_index: int, n: int) -> List[RolloutResult]:
    """The n RolloutResults of one /generate answer (a dict for n=1, a list of n dicts otherwise)."""
    samples = answer if isinstance(answer, list) else [answer]
    if len(samples) != n:
        raise RolloutError(f"request {request_index}: SGLang returned {len(samples)} samples, asked for {n}")
    results = []
    for sample_index, sample in enumerate(samples):
        meta_info = sample["meta_info"]
        token_logprobs = meta_info.get("output_token_logprobs")
        if token_logprobs is None:
            raise RolloutError(f"request {request_index}: SGLang answer has no output_token_logprobs (return_logprob ignored?)")
        # entries are (logprob, token_id, text-or-None); token ids come from here so they align with log-probs
        response_ids = [int(entry[1]) for entry in token_logprobs]
        logprobs = [float(entry[0]) for entry in token_logprobs]
        output_ids = sample.get("output_ids")
        if output_ids is not None and list(output_ids) != response_ids:
            raise RolloutError(
                f"request {request_index} sample {sample_index}: output_ids and output_token_logprobs disagree"
            )
        results.append(
            RolloutResult(
                request_index=request_index,
                sample_index=sample_index,
                response_ids=response_ids,
                logprobs=logprobs,
                finish_reason=_finish_reason(meta_info),
            )
        )
    return results


# ---- weight updates ----
def tensor_update_payload(serialized_per_engine_rank: Sequence[str], weight_version: str) -> dict:
    """/update_weights_from_tensor body: one serialized flattened bucket per engine TP rank."""
    return {
        "serialized_named_tensors": list(serialized_per_engine_rank),
        "load_format": FLATTENED_BUCKET_FORMAT,
        "flush_cache": False,  # flushed once after the last bucket
        "weight_version": weight_version,
    }


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling SGLang resolves with getattr(torch, name)."""
    return str(dtype).removeprefix("torch.")


def distributed_update_payload(named_tensors: Sequence[Tuple[str, torch.Tensor]], group_name: str, weight_version: str) -> dict:
    """/update_weights_from_distributed body: metadata of the tensors broadcast next, in order."""
    return {
        "names": [name for name, _ in named_tensors],
        "dtypes": [dtype_name(tensor.dtype) for _, tensor in named_tensors],
        "shapes": [list(tensor.shape) for _, tensor in named_tensors],
        "group_name": group_name,
        "flush_cache": False,
        "weight_version": weight_version,
    }


def init_group_payload(master_address: str, master_port: int, rank_offset: int, world_size: int, backend: str) -> dict:
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "group_name": DEFAULT_WEIGHT_UPDATE_GROUP,
        "backend": backend,
    }
