"""The typed configuration: one dataclass per section, defaults that run the CPU demo.

Every field is documented where it is declared; YAML files and `key=value` overrides can only set
fields that exist here (see loader.py), so this file is the reference for what can be configured.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

# token rows per chunk of the vocabulary-parallel log-prob and entropy (models/common/logprobs.py); the memory
# planner (parallel/memory_plan.py) sizes the logits' workspace by it
DEFAULT_CHUNK_TOKENS = 1024


@dataclass
class ModelConfig:
    hf_path: str = ""  # Hugging Face directory (config.json, safetensors, tokenizer, preprocessor)
    # megatron-core checkpoint (hf_to_mcore.py) whose weights replace hf_path's; empty hf_path: its hf/ files
    mcore_checkpoint: Optional[str] = None
    family: str = "auto"  # auto: read from config.json model_type; else a model_type of models/<family>/
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    attention_backend: Literal["auto", "sdpa", "te"] = "auto"  # auto: TE when importable, else SDPA
    freeze_vision_tower: bool = False
    freeze_merger: bool = False
    # activation recompute; auto: none when the memory planner (parallel/memory_plan.py) says the run fits the
    # GPU without it, else full (resolved when the trainer starts; CPU runs take none)
    recompute: Literal["none", "selective", "full", "auto"] = "none"
    moe_router_bias_update_rate: float = 0.0  # 0 keeps the expert bias fixed during RL
    make_vocab_size_divisible_by: int = 128  # vocabulary padded to a multiple of this x TP (removed on export)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    expert: int = 1
    expert_tensor: Optional[int] = None  # None: same as tensor
    data: Optional[int] = None  # None: world size / (tensor * pipeline * context)
    sequence_parallel: bool = False


@dataclass
class AugmentConfig:
    rotation_degrees: float = 0.0  # uniform in [-d, d]; 0 disables
    crop_fraction: float = 0.0  # random crop keeping at least (1 - f) of each side; 0 disables


@dataclass
class VideoConfig:
    """How a `videos` entry becomes frames (defaults: qwen-vl-utils', which verl uses); a row's own video keys
    (fps, nframes, min_frames, max_frames, min_pixels, max_pixels, total_pixels, sample_fps) override them."""
    fps: float = 2.0  # frames sampled per second of an encoded clip; a frame list is taken at its sample_fps (this)
    min_frames: int = 4  # sampled frames of an encoded clip at least (fps rule), at most max_frames
    max_frames: int = 768  # also caps a frame list (sampled down evenly beyond it)
    min_pixels: int = 100352  # per frame (128 tokens of 28x28); frames are resized to one size per video
    max_pixels: int = 602112  # per frame (768 tokens of 28x28)
    total_pixels: int = 90316800  # the whole video (0.9 x 128000 tokens of 28x28): more frames, smaller frames


@dataclass
class DataConfig:
    train_files: List[str] = field(default_factory=list)
    val_files: List[str] = field(default_factory=list)
    prompts_per_step: int = 8  # global, across data-parallel ranks
    max_prompt_length: int = 1024  # tokens, image tokens included
    overlong_prompt: Literal["filter", "truncate"] = "filter"
    min_pixels: int = 3136
    max_pixels: int = 401408
    shuffle: bool = True
    seed: int = 1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    video: VideoConfig = field(default_factory=VideoConfig)  # the `videos` column (Qwen2.5-VL)


@dataclass
class SGLangConfig:
    urls: List[str] = field(default_factory=list)  # servers the user started; empty: launch our own
    tensor_parallel: int = 1
    mem_fraction_static: float = 0.6
    enable_memory_saver: bool = True  # needed for release/resume in colocation
    host: str = "127.0.0.1"
    start_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    max_retries: int = 3
    max_restarts: int = 2
    extra_args: List[str] = field(default_factory=list)
    weight_sync: Literal["tensor", "distributed"] = "tensor"  # colocated CUDA IPC, or NCCL broadcast
    retry_backoff_s: float = 1.0  # first wait before retrying a timed-out request; doubles each retry
    max_concurrent_requests: int = 256  # /generate requests in flight per server (SGLang batches them)
    server_module: str = "sglang.launch_server"  # python -m <this> starts a server
    log_dir: str = ""  # server logs; empty: <trainer.run_dir>/sglang
    update_group_backend: Literal["nccl", "gloo"] = "nccl"  # weight_sync=distributed: broadcast backend
    update_group_address: str = ""  # weight_sync=distributed: this node's address the servers reach; empty: host
    # --enable-deterministic-inference: without it SGLang ignores sampling seeds (rollouts are not reproducible);
    # with it, seeded and batch-invariant but slower (pytorch sampler, no custom all-reduce; see docs/sglang.md)
    deterministic_inference: bool = False


@dataclass
class EmbeddedEngineConfig:
    cuda_graphs: bool = True  # capture the decode step per batch-size bucket (GPU only)
    offload_weights: bool = False  # release_memory also moves the engine's weights to CPU
    prefill_tokens: int = 16384  # padded prompt tokens per batched prefill (bounds activation memory)
    # continuous batching admits waiting prompts once free slots take this many (fewer if fewer wait; at most half
    # of the prompts the cache holds): a prefill of a few prompts is host-bound, so four cost about what one does
    admission_prompts: int = 4
    cache_tokens: int = 0  # KV-cache length per sequence; 0: grow to the longest prompt + max_new_tokens
    # False: static batches, for comparison (a batch fills the empty cache and is decoded at its full width until
    # its longest response ends, as HF generate batches; the next is admitted only then)
    continuous_batching: bool = True


@dataclass
class MultiTurnConfig:
    # the environment answering each assistant turn (rollout/environments/): "zoom" (crop the sample's image),
    # "scripted" (replies from extra_info["scripted_replies"]) or "path/to/file.py:ClassName"; empty: single-turn
    environment: str = ""
    max_turns: int = 2  # assistant turns per trajectory; the environment answers between them
    max_total_tokens: int = 4096  # prompt + every turn of a trajectory (must exceed data.max_prompt_length)


@dataclass
class RolloutConfig:
    backend: Literal["embedded", "sglang"] = "embedded"
    n: int = 4  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 64
    stop: List[str] = field(default_factory=list)
    max_batch_size: int = 256  # sequences decoded together by the embedded engine
    release_memory: bool = True  # free KV cache (and weights) during training phases
    # after each sync, compare engine tensors with the actor's; for engines that cannot return them (SGLang),
    # the engine's greedy log-probs of two fixed training prompts with the actor's (trainer/refit_probe.py)
    verify_weight_sync: bool = False
    sync_bucket_mb: int = 512
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    embedded: EmbeddedEngineConfig = field(default_factory=EmbeddedEngineConfig)
    multi_turn: MultiTurnConfig = field(default_factory=MultiTurnConfig)  # each assistant turn <= max_new_tokens


@dataclass
class AlgorithmConfig:
    # a registered advantage estimator (algorithms/registry.py): grpo, rloo, reinforce_plus_plus, gae (with a
    # critic), or one a file in `plugins` registers
    advantage: str = "grpo"
    norm_adv_by_std: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    policy_loss: str = "ppo"  # a registered policy loss: ppo, gspo, or one a file in `plugins` registers
    # "path/to/file.py" or "package.module" imported before the names above are checked: their
    # register_advantage_estimator / register_policy_loss decorators add algorithms (README "Your own algorithm")
    plugins: List[str] = field(default_factory=list)
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO clip-higher uses 0.28
    dual_clip: Optional[float] = None  # e.g. 3.0; None disables
    loss_agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"] = "token_mean"
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_coef: float = 0.0  # 0 disables the reference model
    kl_in_reward: bool = False  # penalise the reward instead of adding a loss term
    entropy_coef: float = 0.0
    tis_cap: Optional[float] = None  # truncated importance sampling cap on rollout/trainer ratio
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    max_refill_rounds: int = 3
    overlong_buffer: int = 0  # DAPO overlong shaping window in tokens; 0 disables
    overlong_penalty: float = 1.0


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    use_distributed_optimizer: bool = True
    offload_during_rollout: bool = False  # optimizer states (fp32 main params, Adam moments) to host while generating
    offload_grads_during_rollout: bool = False  # also release the gradient buffers (re-allocated as zeros)
    offload_params_during_rollout: bool = False  # also move the weights to host (the engine keeps its own copy)


@dataclass
class ActorConfig:
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    micro_batch_tokens: int = 8192  # token budget per packed micro-batch
    # token budget of the forward-only passes (old and reference log-probs, values): they keep no activations,
    # so larger micro-batches fit and run nearer the GPU's peak; None: micro_batch_tokens
    scoring_micro_batch_tokens: Optional[int] = None
    mini_batches_per_step: int = 1  # optimizer steps per RL step
    ppo_epochs: int = 1
    offload_reference: bool = False
    # replay update micro-batches whose shapes repeat as CUDA graphs (trainer/update_graphs.py), skipping the
    # host's work per layer: for fixed-length sequences (RL lengths rarely repeat). Needs the model on one GPU
    # (data parallelism only), a dense model, no recompute; text micro-batches only. Not yet run on a GPU
    # (docs/architecture.md)
    cuda_graphs: bool = False


@dataclass
class CriticConfig:
    hf_path: Optional[str] = None  # None: initialise from the actor's weights
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    value_clip: Optional[float] = 0.2


@dataclass
class RewardConfig:
    function: str = "boxed_math"  # a built-in name, or "path/to/file.py:function_name"
    format_weight: float = 0.0  # weight of the format reward added to the answer reward
    timeout_s: float = 10.0
    reward_model: Optional[str] = None  # HF directory of a VLM reward model
    reward_model_weight: float = 1.0
    reward_model_batch_size: int = 8  # (prompt, images, response) triples per reward-model forward
    num_workers: int = 2  # processes running the answer function; a timed-out one is replaced


@dataclass
class TrainerConfig:
    steps: int = 10
    warmup_sft_steps: int = 0  # supervised steps on ground truth before RL (the tiny demo uses it)
    warmup_sft_lr: float = 1e-3  # learning rate of those steps (the RL schedule starts after them)
    warmup_sft_template: str = "\\boxed{{{answer}}}"  # target text; {answer} is the row's ground truth
    prepare_demo_assets: bool = False  # build model.hf_path (tiny.py) if missing, and missing data files with it
    run_dir: str = "runs/default"
    save_every: int = 0  # steps between checkpoints; 0: only at the end; -1: never (benchmarks)
    resume: str = "auto"  # auto | never | a checkpoint directory
    keep_last: int = 0  # checkpoints kept, the newest (older ones removed after each save); 0: all; 2+ keeps a fallback
    export_hf: bool = False
    seed: int = 1234
    eval_every: int = 0
    max_nonfinite_skips: int = 3
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class EvaluationConfig:
    # held-out metrics per data source, reported as val/<data_source>/<key> beside the accuracy, reward and
    # response length every source reports: {data_source: [metric, ...]}, a metric a built-in (exact_match,
    # math_accuracy, bleu, rouge) or "path/to/file.py:function" (rewards/task_metrics.py; README "Evaluation by task")
    metrics: Dict[str, List[str]] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    project: str = "mmrl_megatron"
    run_name: Optional[str] = None
    console: bool = True
    wandb: bool = True
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    tensorboard: bool = False
    plot_at_end: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
