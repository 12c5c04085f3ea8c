"""The memory planner: parameter counts equal real HF models, the byte arithmetic matches hand-computed
cases, the suggested changes really fit, and every shipped YAML loads (the scale-out ones fit on the GPU
count their header documents)."""
import gc
import glob
import importlib.util
import json
import math
import os
import re

import pytest
import torch

from mmrl_megatron.config import ConfigError, load_config
from mmrl_megatron.config.schema import Config
from mmrl_megatron.parallel.memory_plan import GIB, estimate, suggest_changes, with_overrides
from mmrl_megatron.models.planner_dims import resolve_model_dims
from mmrl_megatron.parallel.model_dims import BUILTIN_MODELS, LanguageDims, ModelDims, VisionDims

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SPEC = importlib.util.spec_from_file_location("plan_tool", os.path.join(REPO, "tools", "plan.py"))
_PLAN_TOOL = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_PLAN_TOOL)
plan_main = _PLAN_TOOL.main
SCALE_OUT_CONFIGS = ["grpo_qwen25vl_32b", "grpo_qwen25vl_72b", "grpo_kimivl_a3b", "ppo_qwen25vl_7b"]

# A toy dense model whose numbers are easy to follow by hand.
TOY = ModelDims("toy", LanguageDims(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=1000,
                                    tied=False),
                VisionDims("qwen2_5_vit", depth=1, hidden=16, ffn=32, heads=2))


def _toy_config(*overrides) -> Config:
    base = ["parallel.tensor=2", "parallel.pipeline=2", "actor.micro_batch_tokens=1000", "data.prompts_per_step=8",
            "rollout.backend=embedded", "rollout.n=4", "rollout.max_batch_size=256", "data.max_prompt_length=100",
            "rollout.max_new_tokens=28", "rollout.release_memory=false", "algorithm.kl_coef=0"]
    return with_overrides(Config(), base + list(overrides))


def _safetensors_numel(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())


@pytest.mark.parametrize("tied", [True, False])
def test_qwen_parameter_count_equals_checkpoint(tmp_path, tied):
    """Invariant: the planner's parameter count from config.json equals the elements in the safetensors."""
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(str(tmp_path), tie_word_embeddings=tied)
    dims = resolve_model_dims(str(tmp_path))
    assert dims.total_params() == _safetensors_numel(str(tmp_path / "model.safetensors"))


def test_mla_moe_parameter_count_equals_transformers_model():
    """Invariant: MLA attention + routed/shared experts + dense first layer count like HF's DeepseekV3
    (the Kimi-VL language model), the expert-bias buffer included since checkpoints store it."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf = DeepseekV3Config(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
                          n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=None,
                          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
                          n_group=1, topk_group=1, tie_word_embeddings=False)
    model = DeepseekV3ForCausalLM(hf)
    expected = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    language = LanguageDims(layers=3, hidden=64, heads=4, kv_heads=4, head_dim=16, ffn=96, vocab=300, tied=False,
                            attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                            num_experts=8, experts_per_token=2, moe_ffn=24, shared_ffn=48, first_dense_layers=1)
    assert ModelDims("toy-mla", language, TOY.vision).language_params() == expected


def test_kimi_config_json_matches_builtin(tmp_path):
    """Invariant: a Kimi-VL config.json with the published values parses to the built-in shape."""
    text = {"hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
            "intermediate_size": 11264, "vocab_size": 163840, "kv_lora_rank": 512, "q_lora_rank": None,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
            "num_experts_per_tok": 6, "moe_intermediate_size": 1408, "n_shared_experts": 2,
            "first_k_dense_replace": 1, "tie_word_embeddings": False}
    vision = {"num_hidden_layers": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
              "patch_size": 14, "merge_kernel_size": [2, 2], "init_pos_emb_height": 64, "init_pos_emb_width": 64}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_vl", "text_config": text,
                                                      "vision_config": vision}))
    parsed, builtin = resolve_model_dims(str(tmp_path)), BUILTIN_MODELS["kimi-vl-a3b"]
    assert (parsed.language, parsed.vision) == (builtin.language, builtin.vision)


def test_model_names_resolve_and_unknown_names_fail():
    """Invariant: hub-style names find their built-in shape; an unknown name lists the known ones."""
    assert resolve_model_dims("Qwen/Qwen2.5-VL-72B-Instruct").name == "qwen2.5-vl-72b"
    assert resolve_model_dims("/ckpt/Qwen2_5-VL-7B-Instruct/").name == "qwen2.5-vl-7b"
    assert resolve_model_dims("moonshotai/Kimi-VL-A3B-Thinking").name == "kimi-vl-a3b"
    with pytest.raises(ConfigError, match="qwen2.5-vl-3b"):
        resolve_model_dims("meta/llama-9b")


def test_toy_arithmetic_by_hand():
    """Invariant: weights, gradients, sharded optimizer, activations, logits and KV cache follow the byte
    accounting in memory_plan's docstring (bf16 weights, fp32 grads, 12 B/param Adam over DP)."""
    # per layer: q 64*64+64, k/v 2*(64*32+32), o 64*64, SwiGLU 3*64*128, two norms 2*64
    layer = 4160 + 4160 + 4096 + 24576 + 128
    assert TOY.language.layer_params_outside_experts(0) == layer == 37120
    vision = TOY.vision_params()
    plan = estimate(_toy_config(), TOY, world_size=8)  # TP2 x PP2 -> data-parallel 2
    assert plan.data_parallel == 2
    first, last = plan.stages
    # vocabulary 1000 padded to a multiple of 128 x TP 2 = 1024; layers, embedding and the tower split over TP,
    # except the tower's patch embedding
    patch = TOY.vision.patch_embed_params()
    first_params = (2 * layer + 1024 * 64 + vision - patch) / 2 + patch
    assert first.training["actor weights"] == 2 * first_params
    assert first.training["gradient buffers"] == 4 * first_params
    assert first.training["optimizer states"] == 12 * first_params / 2
    last_params = (2 * layer + 64 + 1024 * 64) / 2  # two layers + final norm + output layer
    assert last.training["actor weights"] == 2 * last_params
    # no recompute, TP2 without sequence parallel, per token per layer: norm/linear inputs 4*2*64,
    # q/k/v/out 2*(2*4+2*2)*16/2, fused SwiGLU (4+2)*128/2 -> 512 + 192 + 384 = 1088 bytes
    assert first.training["activations"] == 2 * 2 * 1000 * 1088  # 2 micro-batches in flight x 2 layers
    assert last.training["activations"] == 1 * 2 * 1000 * 1088
    # bf16 logits and their gradient for all 1000 tokens, fp32 work for one chunk (here all 1000 rows)
    assert last.training["logits"] == 1024 / 2 * (1000 * (2 + 2) + 1000 * (4 + 4 + 4))
    # images: min(100 prompt tokens, 401408 px / 28**2) = 100 of 128 sample tokens, 4 patches per token
    # -> 3125 patches; per patch and block 2*4*16 full width + (2*4*16 + 6*32) / TP 2 = 288 bytes
    assert first.training["vision activations"] == 2 * 1 * 3125 * 288
    # embedded engine: 8 prompts / DP 2 * n 4 = 16 slots of 128 tokens; 4 layers * 2 * 2 KV heads * 16 * 2 B
    assert first.rollout["engine KV cache"] == 16 * 128 * 512
    assert first.rollout["engine weights"] == 2 * TOY.total_params()

    recompute = estimate(_toy_config("model.recompute=full"), TOY, world_size=8).stages[0]
    assert recompute.training["activations"] == 2 * 2 * 1000 * 128 + 1000 * 1088  # inputs kept + one layer re-run


def test_phases_follow_offload_and_release_settings():
    """Invariant: offloaded or released state leaves the phase it is not needed in, and only that phase."""
    base = estimate(_toy_config("algorithm.kl_coef=0.1"), TOY, 8).stages[0]
    assert base.rollout["optimizer states"] == base.training["optimizer states"] > 0
    assert base.rollout["reference weights"] == base.training["actor weights"]
    offload = estimate(_toy_config("algorithm.kl_coef=0.1", "actor.optim.offload_during_rollout=true",
                                   "actor.offload_reference=true", "rollout.release_memory=true",
                                   "rollout.embedded.offload_weights=true"), TOY, 8).stages[0]
    assert offload.rollout["optimizer states"] == 0 and offload.training["optimizer states"] > 0
    assert offload.rollout["reference weights"] == offload.training["reference weights"] == 0
    assert offload.training["engine weights"] == offload.training["engine KV cache"] == 0
    assert offload.rollout["engine KV cache"] == base.rollout["engine KV cache"] > 0
    sglang = estimate(_toy_config("rollout.backend=sglang", "rollout.sglang.mem_fraction_static=0.5",
                                  "rollout.release_memory=true"), TOY, 8, gpu_memory_gib=80).stages[0]
    assert sglang.rollout["engine weights + KV pool"] == 40 * GIB and sglang.training["engine weights + KV pool"] == 0


@pytest.mark.parametrize("role", ["actor", "critic"])
def test_each_offload_switch_zeroes_its_own_component_during_rollout_only(role):
    """Invariant: each of a role's three offload switches (optimizer states, gradient buffers, weights) zeroes
    exactly that component of that role in the rollout phase; the training phase and every other entry stay."""
    from mmrl_megatron.parallel.memory_plan import ACTOR_COMPONENTS, CRITIC_COMPONENTS

    components = ACTOR_COMPONENTS if role == "actor" else CRITIC_COMPONENTS
    switches = {"optimizer states": "offload_during_rollout", "gradients": "offload_grads_during_rollout",
                "weights": "offload_params_during_rollout"}
    base = estimate(_toy_config("algorithm.advantage=gae"), TOY, 8).stages[0]
    for kind, switch in switches.items():
        stage = estimate(_toy_config("algorithm.advantage=gae", f"{role}.optim.{switch}=true"), TOY, 8).stages[0]
        name = components[kind]
        assert base.rollout[name] > 0 and stage.rollout[name] == 0 and stage.training == base.training, switch
        unchanged = [key for key in base.rollout if key not in (name, "runtime reserve")]
        assert {key: stage.rollout[key] for key in unchanged} == {key: base.rollout[key] for key in unchanged}


def test_weight_offload_is_planned_after_the_weight_sync():
    """Invariant: offloading weights lowers generation's memory but the weight sync, which reads them, still
    holds them: with SGLang (its whole pool back before the sync) the sync is the peak and saves nothing over
    keeping the weights; with the embedded engine the sync holds no KV cache yet. Without weight offload the
    plan has no separate sync phase."""
    assert estimate(_toy_config("actor.optim.offload_during_rollout=true"), TOY, 8).stages[0].sync == {}
    sglang = ["rollout.backend=sglang", "rollout.release_memory=true"]
    kept = estimate(_toy_config(*sglang), TOY, 8)
    offloaded = estimate(_toy_config(*sglang, "actor.optim.offload_params_during_rollout=true"), TOY, 8)
    stage = offloaded.stages[0]
    assert stage.rollout["actor weights"] == 0 and stage.sync["actor weights"] == kept.stages[0].rollout["actor weights"]
    assert offloaded.worst[1] == "sync" and offloaded.peak_gib == pytest.approx(kept.peak_gib)
    embedded = estimate(_toy_config("actor.optim.offload_params_during_rollout=true", "rollout.release_memory=true"),
                        TOY, 8).stages[0]
    assert embedded.sync["engine KV cache"] == 0 < embedded.rollout["engine KV cache"]
    assert embedded.sync["actor weights"] > 0 == embedded.rollout["actor weights"]


def test_impossible_layout_is_refused():
    """Invariant: the planner applies the run's own layout validation (layers divisible by pipeline)."""
    with pytest.raises(ConfigError, match="parallel.pipeline=3"):
        estimate(_toy_config("parallel.pipeline=3"), TOY, world_size=6)


def test_suggestions_fit_when_applied():
    """Invariant: every suggested set of overrides, applied to the config, gives a plan that fits."""
    config = with_overrides(Config(), ["model.hf_path=Qwen/Qwen2.5-VL-7B-Instruct", "rollout.backend=embedded",
                                       "algorithm.kl_coef=0.001", "actor.micro_batch_tokens=16384"])
    dims = BUILTIN_MODELS["qwen2.5-vl-7b"]
    assert not estimate(config, dims, 8).fits
    suggestions = suggest_changes(config, dims, 8, 80.0)
    assert suggestions
    for overrides, peak in suggestions:
        replanned = estimate(with_overrides(config, overrides), dims, 8)
        assert replanned.fits and replanned.peak_gib == pytest.approx(peak)


def test_every_yaml_loads_and_scale_out_layouts_fit(capsys):
    """Invariant: each shipped config loads; each scale-out config fits 80 GiB GPUs at the GPU count its
    header's plan command names (the documented command is the one tested)."""
    paths = sorted(glob.glob(os.path.join(REPO, "yaml_configs", "*.yaml")))
    for path in paths:
        load_config(path)
    for name in SCALE_OUT_CONFIGS:
        path = os.path.join(REPO, "yaml_configs", f"{name}.yaml")
        with open(path) as handle:
            gpus = re.search(r"tools/plan.py --config \S+ --gpus (\d+)", handle.read()).group(1)
        assert plan_main(["--config", path, "--gpus", gpus]) == 0, capsys.readouterr().out
        assert "fits in 80 GiB" in capsys.readouterr().out


def test_cli_reports_misfit_and_errors(capsys):
    """Invariant: tools/plan.py exits 1 with suggestions when the layout does not fit, 2 on a bad layout."""
    path = os.path.join(REPO, "yaml_configs", "grpo_qwen25vl_72b.yaml")
    assert plan_main(["--config", path, "--gpus", "32", "actor.optim.offload_during_rollout=false"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "try: " in out
    assert plan_main(["--config", path, "--gpus", "24"]) == 2
    assert "world size 24" in capsys.readouterr().err


WITHOUT_OFFLOAD = ["actor.optim.offload_during_rollout=false", "critic.optim.offload_during_rollout=false"]


def test_docs_layout_table_matches_the_planner(capsys):
    """Invariant: every row of docs/scale_out.md's layout table is what its plan command prints: the
    layout fits and the peak (and its phase) are the planner's; its "without offload" peak and verdict are
    what the same command prints with the optimizer offload switched off."""
    with open(os.path.join(REPO, "docs", "scale_out.md")) as handle:
        rows = re.findall(r"^\|.*\| ([\d.]+) \((fits|does not fit)\) \| ([\d.]+) \((\w+)\) \| "
                          r"`python tools/plan.py ([^`]+)` \|$", handle.read(), re.M)
    assert len(rows) >= 7
    for without_peak, without_verdict, peak, phase, arguments in rows:
        argv = arguments.split()
        argv[argv.index("--config") + 1] = os.path.join(REPO, argv[argv.index("--config") + 1])
        assert plan_main(argv) == 0, arguments
        printed = re.search(r"peak ([\d.]+) GiB \(\w+ stage, (\w+) phase\)", capsys.readouterr().out)
        assert printed.groups() == (peak, phase), arguments
        assert plan_main(argv + WITHOUT_OFFLOAD) == (0 if without_verdict == "fits" else 1), arguments
        printed = re.search(r"peak ([\d.]+) GiB", capsys.readouterr().out)
        assert printed.group(1) == without_peak, arguments


def _small_qwen_config(**overrides) -> dict:
    """A Qwen2.5-VL config.json dict (transformers 5 form) with the given text / vision_* widths."""
    from mmrl_megatron.models.qwen2_5_vl.tiny import build_byte_tokenizer, tiny_config

    return tiny_config(build_byte_tokenizer(), **overrides).to_dict()


def _model_state_bytes(hf_config: dict, layouts):
    """On each rank, for each (tensor, pipeline) layout: (pipeline rank, bytes of the built actor's
    parameters, bytes of megatron DDP's fp32 gradient buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.models import build_model
    from mmrl_megatron.parallel import ParallelDims, detect_process_place, start_processes

    results = []
    for tensor, pipeline in layouts:
        dims = start_processes(ParallelDims(detect_process_place().world_size, tensor=tensor, pipeline=pipeline),
                               torch.device("cpu"))
        model = build_model(ModelConfig(dtype="bfloat16"), hf_config, dims, "actor")
        ddp = DistributedDataParallel(get_model_config(model), DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                      model)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        gradients = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers + ddp.expert_parallel_buffers)
        results.append((dims.pipeline_rank, weights, gradients))
    return results


def test_weights_and_gradient_buffers_equal_what_megatron_allocates(tmp_path):
    """Invariant: per rank, the planner's weight and gradient-buffer bytes are those of the Qwen2.5-VL
    actor megatron-core builds, at TP=2 (vision tower and padded vocabulary split) and at PP=2 (stages)."""
    from tests.cpu_ranks import run_on_cpu_ranks

    hf_config = _small_qwen_config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=300, tie_word_embeddings=False, vision_hidden_size=32,
                                   vision_out_hidden_size=64, vision_intermediate_size=48,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]})
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    dims = resolve_model_dims(str(tmp_path))
    layouts = [(2, 1), (1, 2)]
    per_rank = run_on_cpu_ranks(2, _model_state_bytes, hf_config, layouts)
    for index, (tensor, pipeline) in enumerate(layouts):
        config = with_overrides(Config(), [f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}",
                                           "data.prompts_per_step=2", "rollout.backend=sglang"])
        stages = estimate(config, dims, world_size=2).stages
        for rank_results in per_rank:
            pipeline_rank, weights, gradients = rank_results[index]
            planned = stages[0] if pipeline_rank == 0 else stages[-1]
            # norms and row-parallel biases are replicated over TP, the planner splits them: < 1% here
            assert planned.training["actor weights"] == pytest.approx(weights, rel=0.01), (tensor, pipeline)
            assert planned.training["gradient buffers"] == pytest.approx(gradients, rel=0.01), (tensor, pipeline)


def _measured_training_peak(hf_config: dict, recompute: str, tokens: int, dims, steps: int = 2) -> int:
    """Peak bytes this run allocates on the GPU over `steps` actor updates (the last `steps - 1` measured, so the
    optimizer states exist): bf16 model, megatron DDP with fp32 grads, distributed Adam, one packed
    micro-batch of `tokens` tokens, chunked vocab-parallel log-probs as the loss."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.utils import get_model_config

    from mmrl_megatron.config.schema import ModelConfig
    from mmrl_megatron.models import build_model
    from mmrl_megatron.models.common.logprobs import vocab_parallel_logprobs
    from mmrl_megatron.models.common.packing import pack_sequences

    gc.collect()  # what earlier tests in this process left behind is not this run's memory
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    model = build_model(ModelConfig(dtype="bfloat16", recompute=recompute), hf_config, dims, "actor").cuda()
    ddp = DistributedDataParallel(get_model_config(model), DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-6, bf16=True,
                                                       use_distributed_optimizer=True), [ddp])
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 256, (1024,), generator=generator).tolist() for _ in range(tokens // 1024)]
    input_ids, cu_seqlens, packed = pack_sequences(sequences)
    positions = torch.cat([torch.arange(len(s)) for s in sequences]).view(1, 1, -1).expand(3, 1, -1)
    input_ids, positions = input_ids.cuda(), positions.contiguous().cuda()
    packed.cu_seqlens_q = packed.cu_seqlens_kv = cu_seqlens.cuda()
    for step in range(steps):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        logits = ddp(input_ids, positions, packed)
        loss = -vocab_parallel_logprobs(logits[:, :-1], input_ids[:, 1:]).mean()
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_training_estimate_within_15_percent_of_measured_peak(tmp_path, recompute):
    """Invariant (issue 10, acceptance 3): on one GPU the planner's training-phase bytes for the actor
    (weights, gradients, optimizer, activations, logits; no engine, no runtime reserve, which
    max_memory_allocated does not see) are within 15% of the measured peak, for a Qwen2.5-VL-7B-width
    model cut to 4 layers. Appends a JSON line to $PLAN_GPU_RESULTS when set."""
    import torch.distributed as dist

    from mmrl_megatron.parallel import ParallelDims, shutdown, start_processes

    tokens = 8192
    hf_config = _small_qwen_config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=4,
                                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                   tie_word_embeddings=False, max_position_embeddings=32768,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                    "mrope_section": [16, 24, 24]},
                                   vision_depth=4, vision_hidden_size=1280, vision_intermediate_size=3420,
                                   vision_num_heads=16, vision_out_hidden_size=3584, vision_window_size=112,
                                   vision_fullatt_block_indexes=[3])
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dims = start_processes(ParallelDims(world_size=1), torch.device("cuda", 0))
    try:
        measured = _measured_training_peak(hf_config, recompute, tokens, dims)
    finally:
        shutdown()
    assert not dist.is_initialized()
    config = with_overrides(Config(), [f"model.recompute={recompute}", f"actor.micro_batch_tokens={tokens}",
                                       "data.max_pixels=0", "algorithm.kl_coef=0", "rollout.backend=sglang",
                                       "data.prompts_per_step=1"])
    [stage] = estimate(config, resolve_model_dims(str(tmp_path)), world_size=1).stages
    actor = ("actor weights", "gradient buffers", "optimizer states", "activations", "vision activations", "logits")
    predicted = sum(stage.training[name] for name in actor)
    record = {"recompute": recompute, "tokens": tokens, "measured_gib": measured / GIB,
              "predicted_gib": predicted / GIB, "error": predicted / measured - 1,
              "device": torch.cuda.get_device_name(0), "components_gib": {n: stage.training[n] / GIB for n in actor}}
    print(json.dumps(record))
    if os.environ.get("PLAN_GPU_RESULTS"):
        with open(os.environ["PLAN_GPU_RESULTS"], "a") as handle:
            handle.write(json.dumps(record) + "\n")
    assert abs(predicted / measured - 1) <= 0.15, record
