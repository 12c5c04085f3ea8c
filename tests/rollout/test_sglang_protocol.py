"""The request bodies we build match SGLang 0.5.23's request types field by field, and answers parse as documented."""
import pytest
import torch

from mmrl_megatron.rollout.errors import RolloutError
from mmrl_megatron.rollout.sglang.payloads import (
    distributed_update_payload,
    generate_payload,
    init_group_payload,
    parse_generate_answer,
    tensor_update_payload,
)
from mmrl_megatron.rollout.sglang.protocol import REQUEST_FIELDS, SAMPLING_PARAM_FIELDS, check_request
from mmrl_megatron.rollout.sglang.serialization import deserialize_bucket, serialize_bucket, split_by_dtype
from mmrl_megatron.rollout.types import RolloutRequest, SamplingParams

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def test_generate_payload_fields_and_types():
    """/generate: GenerateReqInput fields only; 1-D int input_ids, data-URL images, SamplingParams keys."""
    request = RolloutRequest(prompt_ids=[1, 2, 3], images=[PNG_HEADER + b"rest"])
    sampling = SamplingParams(n=1, temperature=0.5, top_p=0.9, top_k=20, max_new_tokens=7,
                              stop_token_ids=[5], stop=["</answer>"], seed=11)
    payload = generate_payload(request, sampling, rid="r0")
    check_request("/generate", payload)
    assert payload["input_ids"] == [1, 2, 3] and payload["rid"] == "r0"
    assert payload["return_logprob"] is True and payload["logprob_start_len"] == -1
    assert payload["image_data"] == ["data:image/png;base64,iVBORw0KGgpyZXN0"]
    params = payload["sampling_params"]
    assert set(params) <= SAMPLING_PARAM_FIELDS
    assert (params["temperature"], params["top_p"], params["top_k"], params["max_new_tokens"]) == (0.5, 0.9, 20, 7)
    assert (params["stop_token_ids"], params["stop"], params["sampling_seed"], params["n"]) == ([5], ["</answer>"], 11, 1)
    assert "image_data" not in generate_payload(RolloutRequest(prompt_ids=[1]), sampling, rid="r1")


def test_a_request_budget_overrides_the_calls_max_new_tokens():
    """A request's own max_new_tokens goes as its sampling_params.max_new_tokens; without one the call's applies."""
    sampling = SamplingParams(max_new_tokens=64)
    budgeted = generate_payload(RolloutRequest(prompt_ids=[1], max_new_tokens=9), sampling, rid="r0")
    check_request("/generate", budgeted)
    assert budgeted["sampling_params"]["max_new_tokens"] == 9
    assert generate_payload(RolloutRequest(prompt_ids=[1]), sampling, rid="r1")["sampling_params"]["max_new_tokens"] == 64


def test_video_prompts_are_refused_not_sent_without_their_videos():
    """A video prompt (second_per_grid_ts set) raises RolloutError naming the embedded backend: SGLang would
    otherwise get the video pads without the frames the trainer scored."""
    with pytest.raises(RolloutError, match="rollout.backend=embedded"):
        generate_payload(RolloutRequest(prompt_ids=[1, 2], second_per_grid_ts=[1.0]), SamplingParams(), rid="r0")


def test_weight_update_payload_fields_and_types():
    """Update routes: required fields present, nothing SGLang 0.5.23 does not define, dtype names as torch spells them."""
    tensors = [("a.weight", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b.bias", torch.zeros(4))]
    tensor_body = tensor_update_payload(["x", "y"], weight_version="3")
    check_request("/update_weights_from_tensor", tensor_body)
    assert tensor_body["load_format"] == "flattened_bucket" and tensor_body["serialized_named_tensors"] == ["x", "y"]
    distributed_body = distributed_update_payload(tensors, "weight_update_group", "3")
    check_request("/update_weights_from_distributed", distributed_body)
    assert distributed_body["names"] == ["a.weight", "b.bias"]
    assert distributed_body["dtypes"] == ["bfloat16", "float32"]
    assert distributed_body["shapes"] == [[2, 3], [4]]
    init_body = init_group_payload("10.0.0.1", 29600, 1, 3, "nccl")
    check_request("/init_weights_update_group", init_body)
    assert REQUEST_FIELDS["/init_weights_update_group"].required <= set(init_body)


def test_check_request_names_unknown_and_missing_fields():
    """A misspelt or missing field fails before the request is sent, naming the field."""
    with pytest.raises(RolloutError, match=r"unknown fields \['serialized_named_tensor'\].*missing fields \['serialized_named_tensors'\]"):
        check_request("/update_weights_from_tensor", {"serialized_named_tensor": []})
    with pytest.raises(RolloutError, match="max_tokens"):
        check_request("/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 3}})


def test_flattened_buckets_round_trip_per_dtype():
    """A mixed bucket splits into single-dtype buckets that the server side gets back bit for bit, by name."""
    tensors = [
        ("model.embed_tokens.weight", torch.randn(5, 3, dtype=torch.bfloat16)),
        ("model.norm.weight", torch.randn(3)),
        ("model.layers.0.input_layernorm.weight", torch.randn(3, dtype=torch.bfloat16)),
        ("visual.merger.mlp.0.bias", torch.randn(2, dtype=torch.float16)),
    ]
    parts = split_by_dtype(tensors)
    assert [[name for name, _ in part] for part in parts] == [
        ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"], ["model.norm.weight"],
        ["visual.merger.mlp.0.bias"],
    ]
    restored = dict(pair for part in parts for pair in deserialize_bucket(serialize_bucket(part)))
    for name, original in tensors:
        assert restored[name].dtype == original.dtype and torch.equal(restored[name], original)
    with pytest.raises(ValueError, match="split_by_dtype"):
        serialize_bucket(tensors)


def test_generate_answer_parsing():
    """output_token_logprobs (logprob, id, text) become ids and log-probs; finish types map; disagreement raises."""
    answer = {
        "text": "hi",
        "output_ids": [7, 8],
        "meta_info": {"finish_reason": {"type": "length", "length": 2},
                      "output_token_logprobs": [[-0.5, 7, None], [-1.25, 8, None]]},
    }
    (result,) = parse_generate_answer(answer, request_index=4, n=1)
    assert (result.request_index, result.response_ids, result.logprobs, result.finish_reason) == (4, [7, 8], [-0.5, -1.25], "length")
    answer["output_ids"] = [7, 9]
    with pytest.raises(RolloutError, match="disagree"):
        parse_generate_answer(answer, 0, 1)
    with pytest.raises(RolloutError, match="returned 1 samples, asked for 2"):
        parse_generate_answer(answer, 0, 2)
