"""The SGLang HTTP contract this backend is written against: the pinned version and, per endpoint,
the request fields that version accepts.

Pinned: sglang 0.5.23 (setup.py extras "sglang", the Dockerfile). The field lists below are the
request dataclasses of that wheel, `sglang/srt/managers/io_struct.py` (GitHub:
`python/sglang/srt/managers/io_struct.py`), read through `sglang/srt/entrypoints/http_server.py`
for which dataclass each route takes; /flush_cache takes no body in 0.5.23 (its `timeout` is a query
parameter). The begin/end weight-update session routes were added by sglang PR #28001; in 0.5.23 the
two update routes fail outside such a session (`managers/scheduler_components/weight_updater.py`).

The client checks every payload against this table before sending it, so a typo fails here, naming
the field (the real server would ignore an unknown field silently: its request structs drop extra
keys, and only a missing required field is refused, with HTTP 422). The contract tests' fake server
behaves like the real one. tests/rollout/sglang_real/ checks this table against the pinned wheel's
own request structs, field for field.
"""
from typing import Dict, FrozenSet, Mapping, NamedTuple

from ..errors import RolloutError

PINNED_SGLANG_VERSION = "0.5.23"

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # sglang/srt/constants.py GPU_MEMORY_TYPE_*
DEFAULT_WEIGHT_UPDATE_GROUP = "weight_update_group"
FLATTENED_BUCKET_FORMAT = "flattened_bucket"  # load_format for FlattenedTensorBucket payloads


class RequestFields(NamedTuple):
    required: FrozenSet[str]
    optional: FrozenSet[str]

    @property
    def allowed(self) -> FrozenSet[str]:
        return self.required | self.optional


def _fields(required=(), optional=()) -> RequestFields:
    return RequestFields(frozenset(required), frozenset(optional))


# route -> fields of its request dataclass in io_struct.py (0.5.23)
REQUEST_FIELDS: Dict[str, RequestFields] = {
    # GenerateReqInput (the subset of its ~60 optional fields that RL rollouts use, plus rid)
    "/generate": _fields(
        optional=(
            "rid", "text", "input_ids", "image_data", "video_data", "sampling_params",
            "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
            "return_text_in_logprobs", "stream", "return_routed_experts", "modalities",
        ),
    ),
    # UpdateWeightsFromTensorReqInput
    "/update_weights_from_tensor": _fields(
        required=("serialized_named_tensors",),
        optional=(
            "load_format", "flush_cache", "abort_all_requests", "weight_version", "selector",
            "torch_empty_cache",
        ),
    ),
    # UpdateWeightsFromDistributedReqInput
    "/update_weights_from_distributed": _fields(
        required=("names", "dtypes", "shapes"),
        optional=(
            "group_name", "flush_cache", "abort_all_requests", "weight_version", "load_format",
            "selector", "torch_empty_cache",
        ),
    ),
    # InitWeightsUpdateGroupReqInput
    "/init_weights_update_group": _fields(
        required=("master_address", "master_port", "rank_offset", "world_size"),
        optional=("group_name", "backend"),
    ),
    # DestroyWeightsUpdateGroupReqInput
    "/destroy_weights_update_group": _fields(optional=("group_name",)),
    # BeginWeightUpdateReqInput / EndWeightUpdateReqInput
    "/begin_weight_update": _fields(optional=("selector",)),
    "/end_weight_update": _fields(),
    # ReleaseMemoryOccupationReqInput / ResumeMemoryOccupationReqInput
    "/release_memory_occupation": _fields(optional=("tags",)),
    "/resume_memory_occupation": _fields(optional=("tags",)),
    # PauseGenerationReqInput / ContinueGenerationReqInput
    "/pause_generation": _fields(optional=("mode",)),
    "/continue_generation": _fields(optional=("torch_empty_cache",)),
    "/flush_cache": _fields(),
}

# SamplingParams (sglang/srt/sampling/sampling_params.py): the keys we send inside sampling_params.
SAMPLING_PARAM_FIELDS = frozenset(
    {
        "max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
        "n", "ignore_eos", "skip_special_tokens", "no_stop_trim", "sampling_seed",
    }
)


def check_request(route: str, payload: Mapping) -> None:
    """Raise RolloutError unless `payload` has every required and only allowed fields of `route`."""
    if route not in REQUEST_FIELDS:
        raise RolloutError(f"{route} is not an SGLang {PINNED_SGLANG_VERSION} route this backend uses")
    fields = REQUEST_FIELDS[route]
    unknown = sorted(set(payload) - fields.allowed)
    missing = sorted(fields.required - set(payload))
    if unknown or missing:
        raise RolloutError(
            f"{route} payload does not match SGLang {PINNED_SGLANG_VERSION}'s request type: "
            f"unknown fields {unknown}, missing fields {missing} (see rollout/sglang/protocol.py)"
        )
    sampling = payload.get("sampling_params")
    if isinstance(sampling, Mapping):
        unknown_sampling = sorted(set(sampling) - SAMPLING_PARAM_FIELDS)
        if unknown_sampling:
            raise RolloutError(f"{route} sampling_params has fields SGLang does not take: {unknown_sampling}")
