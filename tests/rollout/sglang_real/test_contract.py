"""Our SGLang backend against sglang 0.5.23's own code (request structs, JSON contract, ServerArgs
parser, weight deserialisation), imported on CPU by stand_ins.py. CI installs the wheel and runs these
(a missing wheel fails there); elsewhere they skip without it."""
import argparse
import dataclasses
import inspect
import json

import msgspec
import pytest
import torch

from mmrl_megatron.config.schema import SGLangConfig
from mmrl_megatron.rollout.sglang.launcher import launch_command
from mmrl_megatron.rollout.sglang.payloads import (
    distributed_update_payload,
    generate_payload,
    init_group_payload,
    tensor_update_payload,
)
from mmrl_megatron.rollout.sglang.protocol import REQUEST_FIELDS, SAMPLING_PARAM_FIELDS
from mmrl_megatron.rollout.types import RolloutRequest, SamplingParams
from tests.rollout.sglang_real.stand_ins import require_sglang

PNG_HEADER = b"\x89PNG\r\n\x1a\n"
# route -> its request type in io_struct.py, as http_server.py declares the route's body
REQUEST_TYPES = {
    "/generate": "GenerateReqInput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput",
    "/end_weight_update": "EndWeightUpdateReqInput",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
    "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
}
ROUTING_FIELDS = {"rid", "http_worker_ipc"}  # every BaseReq has them; the router fills them


@pytest.fixture(scope="module")
def sglang():
    return require_sglang()


def _struct_fields(cls):
    """(required, all) field names of an io_struct request type (msgspec Struct or dataclass)."""
    if dataclasses.is_dataclass(cls):
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        return required, {f.name for f in fields}
    fields = msgspec.structs.fields(cls)
    return {f.name for f in fields if f.required}, {f.name for f in fields}


def parse_as_server(sglang, route: str, payload: dict):
    """The request object the server's FastAPI route builds from our JSON body (pydantic over the struct)."""
    import pydantic

    return pydantic.TypeAdapter(getattr(sglang.io_struct, REQUEST_TYPES[route])).validate_python(
        json.loads(json.dumps(payload)))


def test_field_table_is_the_wheels_request_types(sglang):
    """protocol.py's table: per route exactly the request type's fields (a subset for /generate), the
    same required ones; the sampling keys we send are keys of the /generate JSON contract."""
    from sglang.api.v1.api_types import SamplingParams as ContractSamplingParams

    assert set(REQUEST_TYPES) == set(REQUEST_FIELDS) - {"/flush_cache"}  # /flush_cache takes a query parameter
    for route, type_name in REQUEST_TYPES.items():
        required, fields = _struct_fields(getattr(sglang.io_struct, type_name))
        table = REQUEST_FIELDS[route]
        assert table.required == required, route
        if route == "/generate":
            assert table.allowed <= fields, sorted(table.allowed - fields)
        else:
            assert table.allowed == fields - ROUTING_FIELDS, (route, sorted(fields - ROUTING_FIELDS ^ table.allowed))
    assert SAMPLING_PARAM_FIELDS <= set(ContractSamplingParams.__struct_fields__)
    flush = inspect.signature(sglang.http_server.flush_cache).parameters
    assert list(flush) == ["timeout"]


class _StandInTokenizer:
    """SamplingParams.normalize encodes stop strings with the server's tokenizer; bytes will do here."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


def test_our_payloads_parse_into_the_request_types(sglang):
    """Every body we send is admitted by the server's own parsing and JSON contract, with the values we meant."""
    from sglang.srt.entrypoints.api_contract import generate_contract_error

    request = RolloutRequest(prompt_ids=[1, 2, 3], images=[PNG_HEADER + b"rest"])
    sampling = SamplingParams(n=1, temperature=0.5, top_p=0.9, top_k=20, max_new_tokens=7,
                              stop_token_ids=[5], stop=["</answer>"], seed=11)
    body = generate_payload(request, sampling, rid="abc-r0s0")
    assert generate_contract_error(json.loads(json.dumps(body))) is None
    generate = parse_as_server(sglang, "/generate", body)
    generate.normalize_batch_and_arguments()
    assert (generate.rid, generate.input_ids, generate.return_logprob, generate.logprob_start_len) == (
        "abc-r0s0", [1, 2, 3], True, -1)
    assert generate.image_data == ["data:image/png;base64,iVBORw0KGgpyZXN0"]
    params = sglang.sampling_params.SamplingParams(**generate.sampling_params)
    params.normalize(_StandInTokenizer())
    params.verify(vocab_size=300)
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.5, 0.9, 20, 7)
    assert (params.stop_token_ids, params.sampling_seed, params.n) == ({5}, 11, 1)

    tensors = [("a.weight", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b.bias", torch.zeros(4))]
    distributed = parse_as_server(sglang, "/update_weights_from_distributed",
                                  distributed_update_payload(tensors, "weight_update_group", "3"))
    assert (distributed.names, distributed.dtypes, distributed.shapes) == (
        ["a.weight", "b.bias"], ["bfloat16", "float32"], [[2, 3], [4]])
    assert [getattr(torch, name) for name in distributed.dtypes] == [torch.bfloat16, torch.float32]
    assert (distributed.flush_cache, distributed.weight_version) == (False, "3")
    group = parse_as_server(sglang, "/init_weights_update_group", init_group_payload("10.0.0.1", 29600, 1, 3, "nccl"))
    assert (group.master_address, group.master_port, group.rank_offset, group.world_size, group.backend) == (
        "10.0.0.1", 29600, 1, 3, "nccl")
    release = parse_as_server(sglang, "/release_memory_occupation", {"tags": None})
    resume = parse_as_server(sglang, "/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]})
    assert release.tags is None and resume.tags == ["kv_cache", "cuda_graph"]


def test_the_real_server_ignores_unknown_request_fields_but_not_unknown_sampling_keys(sglang):
    """What the fake server copies: extra body fields are dropped; an unknown sampling key is a 400."""
    from sglang.srt.entrypoints.api_contract import generate_contract_error

    begin = parse_as_server(sglang, "/begin_weight_update", {"no_such_field": 1})
    assert begin.selector == "all"
    assert generate_contract_error({"input_ids": [1], "no_such_field": 1}) is None
    assert "max_tokens" in generate_contract_error({"input_ids": [1], "sampling_params": {"max_tokens": 3}})
    from sglang.api.v1.api_types import SamplingParams as ContractSamplingParams

    from tests.rollout.fake_sglang_server import CONTRACT_SAMPLING_KEYS

    assert CONTRACT_SAMPLING_KEYS == set(ContractSamplingParams.__struct_fields__)


def test_launch_command_parses_with_sglangs_server_args(sglang):
    """Our launcher's command line is one sglang.launch_server accepts, with the values we meant."""
    config = SGLangConfig(tensor_parallel=2, mem_fraction_static=0.5, deterministic_inference=True,
                          extra_args=["--attention-backend", "fa3"])
    command = launch_command(config, "/models/qwen", "127.0.0.1", 31000, base_gpu_id=2)
    assert command[1:3] == ["-m", "sglang.launch_server"]
    parser = argparse.ArgumentParser()
    sglang.server_args.ServerArgs.add_cli_args(parser)
    args = parser.parse_args(command[3:])
    assert (args.model_path, args.tp_size, args.base_gpu_id, args.mem_fraction_static) == ("/models/qwen", 2, 2, 0.5)
    assert (args.host, args.port, args.attention_backend) == ("127.0.0.1", 31000, "fa3")
    assert args.enable_memory_saver and args.enable_deterministic_inference
    plain = parser.parse_args(launch_command(SGLangConfig(enable_memory_saver=False), "/m", "127.0.0.1", 1, 0)[3:])
    assert not plain.enable_memory_saver and not plain.enable_deterministic_inference


class _RecordingModel:
    def __init__(self):
        self.loaded = []

    def load_weights(self, named_tensors):
        self.loaded.extend((name, tensor.clone()) for name, tensor in named_tensors)


def test_weight_buckets_load_bit_exact_through_sglangs_own_deserialiser(sglang):
    """Each engine TP rank's entry of our /update_weights_from_tensor body, decoded as the HTTP route
    does, unpickled by MultiprocessingSerializer and rebuilt by the weight updater's flattened-bucket
    path, hands the model exactly our tensors: names, dtypes, shapes and bits."""
    from mmrl_megatron.rollout.sglang import serialization

    assert serialization.USING_SGLANG_HELPERS  # as in production: the payload is built by sglang's classes
    generator = torch.Generator().manual_seed(0)
    tensors = [
        ("model.embed_tokens.weight", torch.randn(7, 5, generator=generator).to(torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(5, generator=generator).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(5, generator=generator)),
        ("visual.patch_embed.proj.weight", torch.randn(4, 3, 2, 2, 2, generator=generator).to(torch.float16)),
        ("model.layers.0.mlp.gate_proj.weight", torch.tensor([[float("inf"), -0.0, float("nan")]]).to(torch.bfloat16)),
    ]
    loaded = []
    for part in serialization.split_by_dtype(tensors):
        body = tensor_update_payload([serialization.serialize_bucket(part) for _ in range(2)], weight_version="1")
        request = parse_as_server(sglang, "/update_weights_from_tensor", body)
        assert request.load_format == "flattened_bucket" and len(request.serialized_named_tensors) == 2
        for tp_rank in range(2):
            model = _RecordingModel()
            updater = type("StandInRunner", (), {"get_model": lambda self: model})()
            data = sglang.utils.MultiprocessingSerializer.deserialize(request.serialized_named_tensors[tp_rank])
            success, _ = sglang.weight_updater.WeightUpdater._update_weights_from_flattened_bucket(updater, data)
            assert success
            if tp_rank == 0:
                loaded.extend(model.loaded)
    assert [name for name, _ in loaded] == [name for part in serialization.split_by_dtype(tensors) for name, _ in part]
    by_name = dict(loaded)
    for name, original in tensors:
        got = by_name[name]
        assert got.dtype == original.dtype and got.shape == original.shape
        assert torch.equal(got.view(-1).view(torch.uint8), original.view(-1).view(torch.uint8)), name
