"""Per-GPU memory estimate of a colocated RL run, and the changes that make a layout fit.

A colocated step has two phases that share every GPU: rollout (engine weights + KV cache, with the
actor's weights, gradient buffers and optimizer states resident unless its offload switches say otherwise,
rollout_offload) and training (actor states + activations + logits, with whatever the engine did not
release). When weights are offloaded the weight sync that opens the rollout phase is a third moment (the
engine back, the actor's weights still there). The peak of the phases on the worst pipeline stage (the
first holds the embedding, the vision tower and the most in-flight micro-batches; the last holds the
output layer and the logits) is compared with the GPU.

Byte counts follow megatron-core's mixed-precision accounting (Megatron-LM's theoretical memory):
bf16 weights (2 B), fp32 gradient buffers (4 B: the trainer sets grad_reduce_in_fp32), and fp32
master weights + Adam moments (12 B) sharded over data-parallel ranks by the distributed optimizer.
Activations count the tensors each layer keeps for backward with a flash-style attention (no
sequence-squared scores), so "selective" recompute (core attention only) saves nothing here.
"""
import copy
from dataclasses import dataclass, field, replace
from typing import Dict, List, Tuple

import yaml

from ..config.errors import ConfigError
from ..config.schema import DEFAULT_CHUNK_TOKENS, Config, OptimizerConfig
from ..config.validate import ModelShape, validate_layout
from .model_dims import ModelDims

GIB = 1024 ** 3
# CUDA context, NCCL communicators and their buffers, cuBLAS workspaces: measured totals on H100 runs
# of megatron-core land between 2 and 4 GiB per process; the allocator's fragmentation adds a share.
RUNTIME_RESERVE_BYTES = 3 * GIB
FRAGMENTATION_SHARE = 0.05
# A micro-batch's logits: the bf16 shard kept for backward and its bf16 gradient, counted for every token (an
# upper bound: only response positions reach the output layer, models/common/output_rows.py, and a micro-batch
# may be all response); fp32 work (upcast, exponentials, probabilities) exists only for one chunk of rows at a
# time (logprobs.py).
LOGIT_BYTES_PER_ENTRY = 2 + 2
LOGIT_CHUNK_BYTES_PER_ENTRY = 4 + 4 + 4
# SwiGLU per unit of MLP width: megatron-core's fused SwiGLU keeps only its input (gate + up, 4 B) and the down
# projection keeps its input, the product (2 B); run unfused it also keeps the SiLU output (2 B).
FUSED_SWIGLU_BYTES, UNFUSED_SWIGLU_BYTES = 4 + 2, 4 + 2 + 2
GRADIENT_BYTES = 4  # megatron DDP's grad buffers are fp32 (grad_reduce_in_fp32)
# a trainable role's components by kind, as the table names them
ACTOR_COMPONENTS = {"weights": "actor weights", "gradients": "gradient buffers", "optimizer states": "optimizer states"}
CRITIC_COMPONENTS = {kind: f"critic {name.removeprefix('actor ')}" for kind, name in ACTOR_COMPONENTS.items()}


@dataclass
class StageMemory:
    """Bytes by component in each phase for one pipeline stage of one GPU. `sync` is the weight sync that
    opens the rollout phase (the engine's memory back, the actor's weights still resident), modelled apart
    only when a role offloads its weights during rollout (otherwise it never needs more than generation)."""

    stage: str
    rollout: Dict[str, float] = field(default_factory=dict)
    training: Dict[str, float] = field(default_factory=dict)
    sync: Dict[str, float] = field(default_factory=dict)

    def phases(self) -> List[Tuple[str, Dict[str, float]]]:
        return [("rollout", self.rollout), *([("sync", self.sync)] if self.sync else []), ("training", self.training)]

    def peak(self) -> Tuple[float, str]:
        """(bytes, phase) of the phase that needs most; ties go to the earlier phase."""
        return max(((sum(entries.values()), name) for name, entries in self.phases()),
                   key=lambda item: item[0])


@dataclass
class MemoryPlan:
    model: ModelDims
    world_size: int
    data_parallel: int
    gpu_memory_gib: float
    stages: List[StageMemory]
    warnings: List[str] = field(default_factory=list)

    @property
    def worst(self) -> Tuple[float, str, str]:
        """(peak bytes, phase, stage) of the stage that needs most."""
        return max((*stage.peak(), stage.stage) for stage in self.stages)

    @property
    def peak_gib(self) -> float:
        return self.worst[0] / GIB

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.gpu_memory_gib


def weight_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def optimizer_state_bytes(dtype: str) -> int:
    """Bytes per trainable parameter: Adam's two fp32 moments, plus the fp32 main copy of a bf16 parameter."""
    return 8 if dtype == "float32" else 12


@dataclass(frozen=True)
class OffloadSwitches:
    """What a trainable role frees on the device while the engine generates; the trainer's offload
    (trainer/offload.py) and this plan both read it, so the plan counts what the trainer does."""

    optimizer_states: bool
    gradients: bool
    weights: bool

    @property
    def any(self) -> bool:
        return self.optimizer_states or self.gradients or self.weights


def rollout_offload(optim: OptimizerConfig) -> OffloadSwitches:
    """The offload switches of one role's optimizer config (actor.optim or critic.optim)."""
    return OffloadSwitches(optim.offload_during_rollout, optim.offload_grads_during_rollout,
                           optim.offload_params_during_rollout)


def _rollout_resident(training: Dict[str, float], names: Dict[str, str], switches: OffloadSwitches) -> Dict[str, float]:
    """The rollout phase's copy of a role's training-phase entries, with what `switches` offloads at zero;
    `names` maps "weights", "gradients", "optimizer states" to this role's component names."""
    offloaded = {names["weights"]: switches.weights, names["gradients"]: switches.gradients,
                 names["optimizer states"]: switches.optimizer_states}
    return {name: 0.0 if offloaded.get(name) else value for name, value in training.items()}


def _stage_layers(dims: ModelDims, pipeline: int, stage: int) -> range:
    per_stage = dims.language.layers // pipeline
    return range(stage * per_stage, (stage + 1) * per_stage)


def _layer_activation_bytes_per_token(dims: ModelDims, config: Config) -> float:
    """bf16 bytes one token keeps for backward in one decoder layer on one GPU (no recompute)."""
    lm, p = dims.language, config.parallel
    tensor, expert_tensor = p.tensor, p.expert_tensor or p.tensor
    # Norm inputs and linear inputs are full-width; sequence parallelism splits them over TP.
    replicated = 2 * 4 * lm.hidden / (tensor if p.sequence_parallel else 1)
    if lm.attention == "mla":
        qk = lm.qk_nope_head_dim + lm.qk_rope_head_dim
        attention = 2 * lm.heads * (2 * qk + 2 * lm.v_head_dim) / tensor + 2 * (2 * lm.kv_lora_rank + lm.qk_rope_head_dim)
    else:
        attention = 2 * (2 * lm.heads + 2 * lm.kv_heads) * lm.head_dim / tensor
    swiglu = FUSED_SWIGLU_BYTES if lm.fused_swiglu else UNFUSED_SWIGLU_BYTES
    if lm.num_experts:
        # k routed copies of each token (dispatched input + SwiGLU), shared experts, fp32 router scores
        k = lm.experts_per_token
        mlp = k * (2 * lm.hidden + swiglu * lm.moe_ffn / expert_tensor) + swiglu * lm.shared_ffn / tensor \
            + 8 * lm.num_experts
    else:
        mlp = swiglu * lm.ffn / tensor
    return replicated + attention + mlp


def _image_patches_per_micro_batch(dims: ModelDims, config: Config, tokens: float) -> float:
    """Vision patches in a micro-batch: the image share of a sample's tokens, times merge**2 patches each."""
    vision = dims.vision
    image_tokens = min(config.data.max_prompt_length, config.data.max_pixels // (vision.patch * vision.merge) ** 2)
    sample_tokens = config.data.max_prompt_length + config.rollout.max_new_tokens
    return tokens * image_tokens / sample_tokens * vision.merge ** 2


def _activation_bytes(dims: ModelDims, config: Config, stage: int, layers: int) -> Dict[str, float]:
    p, pipeline = config.parallel, config.parallel.pipeline
    tokens = config.actor.micro_batch_tokens / p.context
    # 1F1B: stage s holds (pipeline - s) micro-batches in flight when there are at least that many.
    in_flight = pipeline - stage
    per_token = _layer_activation_bytes_per_token(dims, config)
    patches = _image_patches_per_micro_batch(dims, config, tokens) if stage == 0 else 0.0
    per_patch = dims.vision.activation_bytes_per_patch(p.tensor)
    if config.model.recompute == "full":
        # Each layer keeps only its input; backward re-runs one layer at a time.
        boundary = 2 * dims.language.hidden / (p.tensor if p.sequence_parallel else 1)
        language = in_flight * layers * tokens * boundary + tokens * per_token
        vision = in_flight * dims.vision.depth * patches * 2 * dims.vision.hidden + patches * per_patch
    else:
        language = in_flight * layers * tokens * per_token
        vision = in_flight * dims.vision.depth * patches * per_patch
    result = {"activations": language}
    if stage == 0:
        result["vision activations"] = vision
    if stage == pipeline - 1:
        shard = padded_vocab(dims, config) / p.tensor
        update = shard * (tokens * LOGIT_BYTES_PER_ENTRY + min(tokens, DEFAULT_CHUNK_TOKENS) * LOGIT_CHUNK_BYTES_PER_ENTRY)
        # a scoring micro-batch's bf16 logits have no gradient; counted as if they met the update's activations
        scoring = (config.actor.scoring_micro_batch_tokens or config.actor.micro_batch_tokens) / p.context
        result["logits"] = max(update, shard * (scoring * 2 + min(scoring, DEFAULT_CHUNK_TOKENS)
                                                * LOGIT_CHUNK_BYTES_PER_ENTRY))
    return result


def padded_vocab(dims: ModelDims, config: Config) -> int:
    """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP (models/*/build.py)."""
    multiple = config.model.make_vocab_size_divisible_by * config.parallel.tensor
    return -(-dims.language.vocab // multiple) * multiple


def _stage_params(dims: ModelDims, config: Config, stage: int) -> Tuple[float, float, float]:
    """(dense params, expert params, vision params) this GPU holds on pipeline stage `stage`."""
    lm, p = dims.language, config.parallel
    expert_split = p.expert * (p.expert_tensor or p.tensor)
    layers = _stage_layers(dims, p.pipeline, stage)
    dense = sum(lm.layer_params_outside_experts(i) for i in layers)
    experts = sum(lm.routed_expert_params(i) for i in layers)
    vocab = padded_vocab(dims, config)
    if stage == 0:
        dense += vocab * lm.hidden
    if stage == p.pipeline - 1:
        # a tied model keeps a copy of the embedding on the last stage to act as the output layer
        dense += lm.hidden + (vocab * lm.hidden if (not lm.tied or p.pipeline > 1) else 0)
    vision = 0.0
    if stage == 0:  # the tower sits whole on the first stage
        vision = dims.vision_params()
        if dims.vision.split_over_tensor_parallel:  # all but the patch embedding is split
            patch = dims.vision.patch_embed_params()
            vision = (vision - patch) / p.tensor + patch
    return dense / p.tensor, experts / expert_split, vision


def _engine_bytes(dims: ModelDims, config: Config, data_parallel: int, gpu_bytes: float) -> Tuple[Dict, Dict]:
    """(rollout-phase, training-phase) bytes the colocated engine holds on one GPU."""
    rollout = config.rollout
    if rollout.backend == "sglang":
        # SGLang takes mem_fraction_static of the GPU for weights + KV pool, whatever the model.
        static = rollout.sglang.mem_fraction_static * gpu_bytes
        released = rollout.release_memory and rollout.sglang.enable_memory_saver
        return {"engine weights + KV pool": static}, {"engine weights + KV pool": 0.0 if released else static}
    weight_bytes = dims.total_params() * (4 if config.model.dtype == "float32" else 2)
    per_rank_sequences = config.data.prompts_per_step // data_parallel * rollout.n
    slots = min(rollout.max_batch_size, per_rank_sequences)
    longest = (rollout.multi_turn.max_total_tokens if rollout.multi_turn.environment  # a whole conversation
               else config.data.max_prompt_length + rollout.max_new_tokens)
    max_len = rollout.embedded.cache_tokens or longest
    kv = slots * max_len * dims.language.kv_bytes_per_token()
    weights_released = rollout.release_memory and rollout.embedded.offload_weights
    training = {"engine weights": 0.0 if weights_released else weight_bytes,
                "engine KV cache": 0.0 if rollout.release_memory else kv}
    return {"engine weights": weight_bytes, "engine KV cache": kv}, training


RECOMPUTE_CHOICES = ("none", "full")  # "selective" saves nothing with a flash-style attention (see above)


def choose_recompute(config: Config, dims: ModelDims, world_size: int, gpu_memory_gib: float) -> str:
    """model.recompute=auto: the least recompute whose plan fits the GPU (full when none does)."""
    for option in RECOMPUTE_CHOICES:
        if estimate(with_overrides(config, [f"model.recompute={option}"]), dims, world_size, gpu_memory_gib).fits:
            return option
    return RECOMPUTE_CHOICES[-1]


def _engine_sync_bytes(engine_rollout: Dict, engine_training: Dict, config: Config) -> Dict[str, float]:
    """The engine during the weight sync: SGLang's pool is back whole (resume_memory restores weights and
    cache); the embedded engine has its weights back and allocates its KV cache at the next generate."""
    if config.rollout.backend == "sglang":
        return dict(engine_rollout)
    return dict(engine_rollout, **{"engine KV cache": engine_training["engine KV cache"]})


def estimate(config: Config, dims: ModelDims, world_size: int, gpu_memory_gib: float = 80.0) -> MemoryPlan:
    """Per-GPU bytes of every component in both phases on the first and last pipeline stage
    (model.recompute=auto planned as choose_recompute resolves it).

    Raises ConfigError (from config.validate) when the layout does not divide the world or the model.
    """
    if config.model.recompute == "auto":
        chosen = choose_recompute(config, dims, world_size, gpu_memory_gib)
        config = with_overrides(config, [f"model.recompute={chosen}"])
    lm, p, optim = dims.language, config.parallel, config.actor.optim
    shape = ModelShape(lm.layers, lm.heads, lm.kv_heads, lm.num_experts)
    data_parallel = validate_layout(config, world_size, shape)
    expert_data_parallel = world_size // (p.pipeline * p.expert * (p.expert_tensor or p.tensor))  # >= 1: validated
    param_bytes, state_bytes = weight_bytes(config.model.dtype), optimizer_state_bytes(config.model.dtype)
    dense_shards = data_parallel * p.context if optim.use_distributed_optimizer else 1
    expert_shards = expert_data_parallel if optim.use_distributed_optimizer else 1
    with_reference = config.algorithm.kl_coef > 0 or config.algorithm.kl_in_reward
    with_critic = config.algorithm.advantage == "gae"
    gpu_bytes = gpu_memory_gib * GIB
    engine_rollout, engine_training = _engine_bytes(dims, config, data_parallel, gpu_bytes)

    stage_ids = sorted({0, p.pipeline - 1})
    stages = []
    for stage in stage_ids:
        dense, experts, vision = _stage_params(dims, config, stage)
        trainable_vision = 0 if config.model.freeze_vision_tower else vision
        params = dense + experts + vision
        weights = params * param_bytes
        gradients = (dense + experts + trainable_vision) * GRADIENT_BYTES
        optimizer = (dense / dense_shards + experts / expert_shards + trainable_vision / dense_shards) * state_bytes
        roles = [({"actor weights": weights, "gradient buffers": gradients, "optimizer states": optimizer},
                  ACTOR_COMPONENTS, rollout_offload(optim))]
        if with_critic:  # a critic the size of the actor (its value head is negligible) keeps the same states
            roles.append(({"critic weights": weights, "critic gradient buffers": gradients,
                           "critic optimizer states": optimizer}, CRITIC_COMPONENTS, rollout_offload(config.critic.optim)))
        training, rollout, sync = {}, {}, {}
        for entries, names, switches in roles:
            training.update(entries)
            rollout.update(_rollout_resident(entries, names, switches))
            # the trainer offloads weights only after the sync, which reads them (trainer/offload.py)
            sync.update(_rollout_resident(entries, names, replace(switches, weights=False)))
        if with_reference:
            for phase in (rollout, sync, training):
                phase["reference weights"] = 0.0 if config.actor.offload_reference else weights
        training.update(_activation_bytes(dims, config, stage, len(_stage_layers(dims, p.pipeline, stage))))
        rollout.update(engine_rollout)
        sync.update(_engine_sync_bytes(engine_rollout, engine_training, config))
        training.update(engine_training)
        if not any(switches.weights for _, _, switches in roles):
            sync = {}
        for phase in (rollout, sync, training):
            if phase:
                phase["runtime reserve"] = RUNTIME_RESERVE_BYTES + FRAGMENTATION_SHARE * sum(phase.values())
        name = "first" if stage == 0 else "last"
        stages.append(StageMemory("only" if p.pipeline == 1 else name, rollout, training, sync))
    return MemoryPlan(dims, world_size, data_parallel, gpu_memory_gib, stages, _engine_warnings(dims, config, gpu_bytes))


def _engine_warnings(dims: ModelDims, config: Config, gpu_bytes: float) -> List[str]:
    rollout = config.rollout
    if rollout.backend == "sglang":
        shard = dims.total_params() * 2 / rollout.sglang.tensor_parallel
        pool = rollout.sglang.mem_fraction_static * gpu_bytes
        if shard > 0.8 * pool:
            return [f"SGLang's static pool ({pool / GIB:.1f} GiB = rollout.sglang.mem_fraction_static x GPU) leaves "
                    f"under 20% for the KV cache after {shard / GIB:.1f} GiB of weights per GPU; raise "
                    "rollout.sglang.tensor_parallel or mem_fraction_static"]
    elif dims.language.num_experts or dims.vision.kind != "qwen2_5_vit":
        return ["the plan models the embedded engine's memory for Qwen2.5-VL only (it runs Kimi-VL too, with an "
                "MLA latent KV cache and no CUDA graphs); measure it, or use rollout.backend=sglang for this model"]
    return []


def with_overrides(config: Config, overrides: List[str]) -> Config:
    """A copy of `config` with `key=value` overrides (values read as YAML scalars) applied.

    Hand-written rather than load_config's OmegaConf merge: that round trip costs about 0.3 s per copy and
    the suggestion search makes dozens. Keys are checked; values are trusted (they come from load_config'd
    configs or from this module's own candidates)."""
    result = copy.deepcopy(config)
    for item in overrides:
        key, _, text = item.partition("=")
        *parents, leaf = key.split(".")
        target = result
        for name in parents:
            target = getattr(target, name, None)
        if target is None or not hasattr(target, leaf):
            raise ConfigError(f"unknown config key '{key}' in override '{item}'")
        setattr(target, leaf, yaml.safe_load(text))
    return result


def _candidate_changes(config: Config, dims: ModelDims, world_size: int) -> List[List[str]]:
    """Single changes that lower memory, each a list of overrides (cheapest in throughput first)."""
    p, optim, rollout = config.parallel, config.actor.optim, config.rollout
    changes = []
    if rollout.backend == "embedded":
        if not rollout.embedded.offload_weights:
            changes.append(["rollout.embedded.offload_weights=true"])
        if rollout.max_batch_size > 32:
            changes.append([f"rollout.max_batch_size={rollout.max_batch_size // 2}"])
        local = min(world_size, 8)
        engine_tp = next((t for t in (2, 4, 8) if t <= local and local % t == 0 and dims.language.heads % t == 0), 0)
        if engine_tp:
            changes.append(["rollout.backend=sglang", f"rollout.sglang.tensor_parallel={engine_tp}"])
    elif rollout.sglang.mem_fraction_static > 0.3:
        changes.append([f"rollout.sglang.mem_fraction_static={rollout.sglang.mem_fraction_static - 0.1:.2f}"])
    if not rollout.release_memory:
        changes.append(["rollout.release_memory=true"])
    roles = [("actor", optim)] + ([("critic", config.critic.optim)] if config.algorithm.advantage == "gae" else [])
    for role, role_optim in roles:
        for switch in ("offload_during_rollout", "offload_grads_during_rollout", "offload_params_during_rollout"):
            if not getattr(role_optim, switch):
                changes.append([f"{role}.optim.{switch}=true"])
    if not optim.use_distributed_optimizer:
        changes.append(["actor.optim.use_distributed_optimizer=true"])
    if (config.algorithm.kl_coef > 0 or config.algorithm.kl_in_reward) and not config.actor.offload_reference:
        changes.append(["actor.offload_reference=true"])
    if p.tensor > 1 and not p.sequence_parallel:
        changes.append(["parallel.sequence_parallel=true"])
    if config.model.recompute != "full":
        changes.append(["model.recompute=full"])
    if config.actor.micro_batch_tokens >= 4096:
        changes.append([f"actor.micro_batch_tokens={config.actor.micro_batch_tokens // 2}"])
    if p.tensor < 8:
        changes.append([f"parallel.tensor={p.tensor * 2}", "parallel.data=null"])
    changes.append([f"parallel.pipeline={p.pipeline * 2}", "parallel.data=null"])
    if dims.language.num_experts:
        changes.append([f"parallel.expert={p.expert * 2}", "parallel.data=null"])
    return changes


def _combine(overrides: List[str], change: List[str]) -> List[str]:
    """`overrides` then `change`, one entry per key (a later value replaces an earlier one in place)."""
    merged = {}
    for item in overrides + change:
        merged[item.split("=", 1)[0]] = item
    return list(merged.values())


def suggest_changes(config: Config, dims: ModelDims, world_size: int, gpu_memory_gib: float,
                    max_changes: int = 6) -> List[Tuple[List[str], float]]:
    """Ways to fit, as (overrides, peak GiB): every single change that fits alone; when none does, the
    greedy chain that lowers the peak most at each step (or the best reached). Layouts the world size
    or the model cannot take are skipped."""
    def peak(overrides):
        try:
            return estimate(with_overrides(config, overrides), dims, world_size, gpu_memory_gib).peak_gib
        except ConfigError:
            return None

    singles = [(change, peak(change)) for change in _candidate_changes(config, dims, world_size)]
    fitting = sorted([(c, g) for c, g in singles if g is not None and g <= gpu_memory_gib], key=lambda item: item[1])
    if fitting:
        return fitting
    chosen: List[str] = []
    best = peak(chosen)
    for _ in range(max_changes):
        trial_config = with_overrides(config, chosen)
        options = [(_combine(chosen, change), peak(_combine(chosen, change)))
                   for change in _candidate_changes(trial_config, dims, world_size)]
        options = [(c, g) for c, g in options if g is not None and g < best]
        if not options:
            break
        chosen, best = min(options, key=lambda item: item[1])
        if best <= gpu_memory_gib:
            break
    return [(chosen, best)] if chosen else []


def format_plan(plan: MemoryPlan) -> str:
    """A table of GiB per component, one column per (stage, phase), and the verdict."""
    columns = [(stage, phase) for stage in plan.stages for phase, _ in stage.phases()]
    components = list(dict.fromkeys(name for stage, phase in columns for name in getattr(stage, phase)))
    dims, lm = plan.model, plan.model.language
    lines = [f"model {dims.name}: {dims.total_params() / 1e9:.2f} B parameters "
             f"(language {dims.language_params() / 1e9:.2f} B, vision {dims.vision_params() / 1e9:.2f} B"
             + (f", {lm.num_experts} experts, top-{lm.experts_per_token}" if lm.num_experts else "") + ")",
             f"{plan.world_size} GPUs, data-parallel {plan.data_parallel}; GiB per GPU:"]
    header = [f"{stage.stage}/{phase}" for stage, phase in columns]
    width = max(len(name) for name in components + ["total"]) + 2
    lines.append(" " * width + "".join(f"{title:>18}" for title in header))
    for name in components:
        values = [getattr(stage, phase).get(name, 0.0) / GIB for stage, phase in columns]
        lines.append(f"{name:<{width}}" + "".join(f"{value:>18.1f}" for value in values))
    totals = [sum(getattr(stage, phase).values()) / GIB for stage, phase in columns]
    lines.append(f"{'total':<{width}}" + "".join(f"{value:>18.1f}" for value in totals))
    peak, phase, stage = plan.worst
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"peak {peak / GIB:.1f} GiB ({stage} stage, {phase} phase): {verdict} in {plan.gpu_memory_gib:g} GiB")
    lines.extend(f"warning: {warning}" for warning in plan.warnings)
    return "\n".join(lines)
