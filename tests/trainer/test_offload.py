"""Offload during rollout (trainer/offload.py): emptying and refilling the optimizer states, gradient buffers
and weights frees their memory and changes nothing about training (bit-exact), for megatron-core's plain
optimizer on CPU ranks and its distributed optimizer on a GPU; the trainer frees exactly what the memory
planner counts as absent during rollout."""
import numpy as np
import pytest
import torch

from tests.cpu_ranks import run_on_cpu_ranks

STEPS = 3
ALL_SWITCHES = ["actor.optim.offload_during_rollout=true", "actor.optim.offload_grads_during_rollout=true",
                "actor.optim.offload_params_during_rollout=true"]


def test_storages_straddling_host_blocks_come_back_exactly(monkeypatch):
    """Invariant: storages laid over several host blocks (here 64 B each) are emptied to 0 bytes and come
    back bit-exact, round after round, with views into them still valid; the host arena holds less than
    one block beyond the bytes offloaded (torch's pinned allocator would round each buffer up to a power of 2)."""
    from mmrl_megatron.trainer import offload as offloading

    monkeypatch.setattr(offloading, "MAX_BLOCK_BYTES", 64)
    tensors = [torch.randn(size, generator=torch.Generator().manual_seed(size)) for size in (3, 40, 1, 17, 100)]
    views = [tensor[1:] for tensor in tensors]
    expected = [tensor.clone() for tensor in tensors]
    offloaded = offloading.OffloadedStorages(keep_values=True)
    for _ in range(2):
        freed = offloaded.offload(offloading._distinct_storages(tensors, torch.device("cpu")))
        assert freed == 4 * 161 and all(t.untyped_storage().nbytes() == 0 for t in tensors)
        assert freed <= sum(block.numel() for block in offloaded._arena.blocks) < freed + 64
        offloaded.onload()
        assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
        assert all(torch.equal(v, e[1:]) for v, e in zip(views, expected))


def _gpt(device: torch.device, seed: int = 0, experts: int = 0):
    """A tiny megatron GPT on `device`: bf16 on a GPU (the optimizer keeps fp32 main parameters), fp32 on the
    CPU (megatron-core's mixed-precision optimizers take CUDA tensors only); with `experts`, MoE layers."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        bf16=_bf16(device), params_dtype=_dtype(device), pipeline_dtype=_dtype(device),
        use_cpu_initialization=device.type == "cpu", hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        **(dict(num_moe_experts=experts, moe_router_topk=2, moe_token_dispatcher_type="allgather",
                expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size()) if experts else {}),
    )
    if experts:
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):  # referenced by the router, defined only by a TE import
            moe_utils.te_general_gemm = None
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    spec = get_gpt_layer_local_spec(num_experts=experts or None, moe_grouped_gemm=False)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64,
                     max_sequence_length=64, pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(), position_embedding_type="rope")
    # megatron's local LayerNorm keeps an fp32 weight, which torch's CUDA kernel refuses beside bf16 input
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.to(_dtype(device))
    return model.to(device)


def _bf16(device: torch.device) -> bool:
    return device.type == "cuda"


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if _bf16(device) else torch.float32


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A host copy that crosses process boundaries by value (the ranks are spawned processes); cloned first,
    since a numpy view of a tensor's own memory makes its storage non-resizable (no more offload)."""
    return tensor.detach().float().cpu().clone().numpy()


def _train_one_step(chunks, optimizer, scheduler, tokens) -> None:
    from mmrl_megatron.trainer.optim import clipped_step

    chunks[0].zero_grad_buffer()
    optimizer.zero_grad()
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    chunks[0](tokens, positions, attention_mask=None).float().square().mean().backward()
    chunks[0].finish_grad_sync()
    stepped, _ = clipped_step(optimizer, scheduler, max_norm=1.0)
    assert stepped


def _trained_state(device: torch.device, offload: bool, distributed: bool, experts: int = 0):
    """Weights and Adam moments after STEPS clipped steps; with `offload` everything is offloaded and
    onloaded between steps (checking each time that the device memory under it is gone)."""
    import torch.distributed as dist

    from mmrl_megatron.config.schema import OptimizerConfig
    from mmrl_megatron.trainer import offload as offloading
    from mmrl_megatron.trainer.optim import build_optimizer, wrap_for_data_parallel

    model = _gpt(device, experts=experts)
    chunks = wrap_for_data_parallel([model], model.config, distributed)
    optimizer, scheduler = build_optimizer(chunks, OptimizerConfig(lr=1e-2, use_distributed_optimizer=distributed),
                                           STEPS, bf16=_bf16(device), device=device)
    chained = len(getattr(optimizer, "chained_optimizers", [])) > 1  # a dense and an expert optimizer
    assert bool(experts) == chained == bool(chunks[0].expert_parallel_buffers)
    generator = torch.Generator().manual_seed(100 + dist.get_rank())
    tokens = torch.randint(0, 64, (2, 16), generator=generator).to(device)
    freed = []
    for _ in range(STEPS):
        if offload:
            parts = [offloading.offload_optimizer_states(optimizer, chunks, device),
                     offloading.offload_gradients(chunks, device), offloading.offload_weights(chunks, device)]
            storages = (offloading.optimizer_state_storages(optimizer, chunks, device)
                        + offloading.gradient_storages(chunks, device) + offloading.weight_storages(chunks, device))
            assert storages == [], "an offloaded storage still holds memory on the device"
            freed.append([part.bytes for part in parts])
            for part in parts:
                offloading.onload_storages(part)
        _train_one_step(chunks, optimizer, scheduler, tokens)
    weights = {name: _array(p) for name, p in model.named_parameters()}
    moments = [_array(value) for value in offloading.optimizer_state_tensors(optimizer)]
    trainable = sum(p.numel() for p in model.parameters())
    return weights, moments, freed, trainable, len(list(model.parameters()))


def _with_and_without_offload(device_name: str, distributed: bool, experts: int = 0):
    from mmrl_megatron.parallel import ParallelDims, detect_process_place, start_processes

    # with experts, expert-parallel over every rank (megatron-core keeps expert grads apart only then)
    world = detect_process_place().world_size
    device = torch.device(device_name)
    start_processes(ParallelDims(world, expert=world if experts else 1), device)
    return _trained_state(device, False, distributed, experts), _trained_state(device, True, distributed, experts)


def _assert_same_training(plain, offloaded) -> None:
    (weights, moments, *_), (offloaded_weights, offloaded_moments, *_) = plain, offloaded
    assert weights.keys() == offloaded_weights.keys()
    for name in weights:
        assert np.array_equal(weights[name], offloaded_weights[name]), name
    assert len(moments) == len(offloaded_moments) > 0
    assert all(np.array_equal(a, b) for a, b in zip(moments, offloaded_moments))


@pytest.fixture(scope="module")
def plain_optimizer_runs():
    return run_on_cpu_ranks(2, _with_and_without_offload, "cpu", False)


def test_round_trips_between_steps_train_bit_identically_plain_optimizer(plain_optimizer_runs):
    """Invariant: on 2 data-parallel CPU ranks with megatron-core's plain optimizer (fp32 model), offloading and onloading optimizer states, gradients and weights before every step leaves
    the weights and Adam moments bit-identical to a run without offload, and frees every storage."""
    for plain, offloaded in plain_optimizer_runs:
        _assert_same_training(plain, offloaded)


def test_round_trips_train_bit_identically_with_experts():
    """Invariant: with MoE layers at expert-parallel 2, megatron-core chains a dense and an expert optimizer
    and DDP keeps separate expert grad buffers; offloading both between steps still trains bit-identically
    and frees them all."""
    for plain, offloaded in run_on_cpu_ranks(2, _with_and_without_offload, "cpu", False, 2):
        _assert_same_training(plain, offloaded)


def test_offloaded_bytes_are_what_the_planner_counts(plain_optimizer_runs):
    """Invariant: the bytes freed are the planner's per-parameter counts for an fp32 model: optimizer states
    8 B (two Adam moments; plus Adam's 4 B step counter per tensor, which the plan leaves out), gradient
    buffers 4 B, weights 4 B; before the first step Adam has no states yet."""
    from mmrl_megatron.parallel.memory_plan import GRADIENT_BYTES, optimizer_state_bytes, weight_bytes

    _, (_, _, freed, numel, tensors) = plain_optimizer_runs[0]
    optimizer, gradients, weights = freed[-1]
    assert optimizer == optimizer_state_bytes("float32") * numel + 4 * tensors
    assert gradients == GRADIENT_BYTES * numel and weights == weight_bytes("float32") * numel
    assert freed[0][0] == 0


def _trainer_state_after_steps(root: str, overrides):
    """Final weights and Adam moments of every trainable role, and the metrics, of 2 stand-in RL steps."""
    from tests.trainer.stand_ins import stand_in_config, stand_in_trainer

    from mmrl_megatron.trainer import offload as offloading

    trainer = stand_in_trainer(stand_in_config(root, ["trainer.steps=2", "algorithm.kl_coef=0", *overrides]))
    metrics = trainer.run()
    trainer.parts.tracker.close()
    roles = [role for role in (trainer.parts.actor, trainer.parts.critic) if role is not None]
    with trainer.offload.onloaded():  # a run ends after its last weight sync, with the switches' parts offloaded
        states = [({name: _array(p) for name, p in role.chunks[0].named_parameters()},
                   [_array(t) for t in offloading.optimizer_state_tensors(role.optimizer)]) for role in roles]
    return states, metrics


def _loop_with_and_without(root: str):
    """GRPO with every actor switch on, and PPO with every actor and critic switch on, each beside the same
    run without offload."""
    critic_switches = [switch.replace("actor.", "critic.") for switch in ALL_SWITCHES]
    ppo = ["algorithm.advantage=gae"]
    return {"grpo": (_trainer_state_after_steps(f"{root}/grpo", []),
                     _trainer_state_after_steps(f"{root}/grpo_offload", ALL_SWITCHES)),
            "ppo": (_trainer_state_after_steps(f"{root}/ppo", ppo),
                    _trainer_state_after_steps(f"{root}/ppo_offload", ppo + ALL_SWITCHES + critic_switches))}


def test_loop_offloads_around_rollout_without_changing_training(tmp_path):
    """Invariant: with every offload switch on (actor, and critic for PPO), the RL loop offloads around each
    weight sync and brings everything back after generation (reporting bytes and seconds; the final
    checkpoint saves onloaded states), and every role's weights and Adam moments after 2 steps equal those
    of the run without offload."""
    [runs] = run_on_cpu_ranks(1, _loop_with_and_without, str(tmp_path))
    for name, ((plain, plain_metrics), (offloaded, metrics)) in runs.items():
        assert len(plain) == len(offloaded) == (2 if name == "ppo" else 1)
        for plain_role, offloaded_role in zip(plain, offloaded):
            _assert_same_training(plain_role, offloaded_role)
        assert metrics["offload/gigabytes"] > 0 and metrics["offload_weights/gigabytes"] > 0
        assert metrics["time/offload_s"] >= 0 and metrics["time/onload_s"] >= 0
        assert "offload/gigabytes" not in plain_metrics and "time/onload_s" not in plain_metrics


def _offloaded_components(switch_overrides):
    """Which of a role's component kinds the trainer leaves empty during rollout under these switches,
    after one step (Adam's states exist from then on)."""
    from types import SimpleNamespace

    from tests.trainer.stand_ins import stand_in_config

    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.trainer import offload as offloading
    from mmrl_megatron.trainer.build import build_role

    device, results = torch.device("cpu"), []
    dims = start_processes(ParallelDims(world_size=1), device)
    for overrides in switch_overrides:
        config = stand_in_config("unused", list(overrides))
        actor = build_role("actor", _gpt(device), config, device, dims, config.actor.optim)
        _train_one_step(actor.chunks, actor.optimizer, actor.scheduler, torch.randint(0, 64, (2, 16)))
        hooks = offloading.rollout_offload_for(SimpleNamespace(config=config, actor=actor, critic=None))

        def empty():
            return {"weights": not offloading.weight_storages(actor.chunks, device),
                    "gradients": not offloading.gradient_storages(actor.chunks, device),
                    "optimizer states": not offloading.optimizer_state_storages(actor.optimizer, actor.chunks, device)}

        hooks.before_engine_resumes()
        at_sync = empty()
        hooks.after_weight_sync()
        results.append((at_sync, empty()))
        hooks.after_rollout()
        assert not any(empty().values()), "after_rollout left something off the device"
    return results


def test_trainer_frees_exactly_what_the_plan_zeroes():
    """Invariant: with no switch and with each switch alone, the components the trainer has emptied during
    generation are the ones the memory planner counts as zero in the rollout phase, and nothing else; during
    the weight sync the weights are still there, as the plan's sync phase counts them."""
    from mmrl_megatron.config.schema import Config
    from mmrl_megatron.parallel.memory_plan import ACTOR_COMPONENTS, estimate, with_overrides
    from tests.tools.test_plan import TOY

    cases = [[], *[[switch] for switch in ALL_SWITCHES]]
    [trainer_empty] = run_on_cpu_ranks(1, _offloaded_components, cases)
    for overrides, (at_sync, during_generation) in zip(cases, trainer_empty):
        config = with_overrides(Config(), ["rollout.backend=sglang", "algorithm.kl_coef=0", "data.prompts_per_step=8",
                                           *overrides])
        [stage] = estimate(config, TOY, world_size=1).stages
        assert during_generation == {kind: stage.rollout[name] == 0 for kind, name in ACTOR_COMPONENTS.items()}
        sync = stage.sync or stage.rollout  # the plan models the sync apart only when weights are offloaded
        assert at_sync == {kind: sync[name] == 0 for kind, name in ACTOR_COMPONENTS.items()}, overrides


@pytest.mark.gpu
@pytest.mark.parametrize("distributed", [True, False])
def test_round_trips_between_steps_train_bit_identically_on_gpu(distributed):
    """Invariant: on one GPU with megatron-core's distributed optimizer and with its plain mixed-precision one
    (bf16 model, fp32 grad buffer and main parameters), offload/onload of everything before every step keeps
    training bit-identical, and the device's allocated memory falls by at least the bytes offloaded."""
    import os

    import torch.distributed as dist

    from mmrl_megatron.parallel import shutdown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29519", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        plain, offloaded = _with_and_without_offload("cuda", distributed)
        _assert_same_training(plain, offloaded)
        _assert_round_trip_frees_and_restores(distributed)
    finally:
        shutdown()
    assert not dist.is_initialized()


def _assert_round_trip_frees_and_restores(distributed: bool) -> None:
    """Allocated memory falls by at least the bytes offloaded and returns to its level; every weight, main
    parameter and Adam moment holds its bytes again (the step after is then the step without offload)."""
    from mmrl_megatron.config.schema import OptimizerConfig
    from mmrl_megatron.trainer import offload as offloading
    from mmrl_megatron.trainer.optim import build_optimizer, wrap_for_data_parallel

    device = torch.device("cuda")
    model = _gpt(device)
    chunks = wrap_for_data_parallel([model], model.config, distributed)
    optimizer, scheduler = build_optimizer(chunks, OptimizerConfig(use_distributed_optimizer=distributed), 1,
                                           bf16=True, device=device)
    _train_one_step(chunks, optimizer, scheduler, torch.randint(0, 64, (2, 16), device=device))
    tensors = list(model.parameters()) + offloading.optimizer_state_tensors(optimizer)
    snapshot = [tensor.detach().clone() for tensor in tensors]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    parts = [offloading.offload_optimizer_states(optimizer, chunks, device),
             offloading.offload_gradients(chunks, device), offloading.offload_weights(chunks, device)]
    freed = sum(part.bytes for part in parts)
    assert freed > 0 and before - torch.cuda.memory_allocated() >= freed
    for part in parts:
        offloading.onload_storages(part)
    assert torch.cuda.memory_allocated() == before
    assert all(torch.equal(tensor, copy) for tensor, copy in zip(tensors, snapshot))
