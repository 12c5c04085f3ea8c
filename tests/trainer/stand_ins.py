"""Small stand-ins for the parts the loop drives (model, engine, rewards, data), so the loop's mechanics
(pipeline schedule, optimizer, checkpoints, metrics) are tested on CPU ranks in seconds. The real parts
are exercised by the demo test (tests/trainer/test_demo.py)."""
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import List

import torch

from mmrl_megatron.rollout import RolloutEngine, RolloutResult

VOCAB, HIDDEN, LAYERS, HEADS = 64, 32, 4, 4
PROMPT_LENGTH = 6


def stand_in_model(role: str, seed: int = 0):
    """A megatron-core GPT taking the project's model call signature (ids, [3,1,T] positions, packing, images);
    role "critic" returns one value per token."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    class PackedInterfaceGPT(GPTModel):
        def forward(self, input_ids, position_ids, packed_seq_params, pixel_values=None, image_grid_thw=None,
                    prompt_mask=None, output_rows=None):
            output = super().forward(input_ids, position_ids[0], attention_mask=None)
            if not self.post_process:
                return output
            if output_rows is not None:  # the models' contract: only those positions come out
                output = output[:, output_rows]
            if role != "critic":
                return output
            total = tensor_parallel.reduce_from_tensor_model_parallel_region(output.sum(dim=-1))
            return total / VOCAB

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=2, ffn_hidden_size=64,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    torch.manual_seed(seed)
    return PackedInterfaceGPT(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                              max_sequence_length=256, pre_process=parallel_state.is_pipeline_first_stage(),
                              post_process=parallel_state.is_pipeline_last_stage(),
                              share_embeddings_and_output_weights=False, position_embedding_type="rope")


def pack_sequences(sequences: List[List[int]]):
    lengths = torch.tensor([len(s) for s in sequences])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return torch.tensor([t for s in sequences for t in s]).unsqueeze(0), cu_seqlens, None


def vocab_parallel_logprobs(logits, labels, group=None):
    """megatron-core's cross-entropy over its own tensor-parallel group (the `group` the trainer passes)."""
    from megatron.core import tensor_parallel

    return -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


def vocab_parallel_entropy(logits, group=None):
    from megatron.core import tensor_parallel

    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.float())
    logp = torch.log_softmax(full, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def use_stand_in_logprobs() -> None:
    from mmrl_megatron.trainer import losses

    def both(logits, labels, group=None):
        return vocab_parallel_logprobs(logits, labels, group), vocab_parallel_entropy(logits, group)

    losses._vocab_parallel = lambda: (vocab_parallel_logprobs, both)


class StandInEngine(RolloutEngine):
    """Seeded random responses of varying length with uniform log-probs; records weight updates."""

    def __init__(self):
        self.updates = 0

    def generate(self, requests, sampling):
        results = []
        for index, request in enumerate(requests):
            for sample in range(sampling.n):
                generator = torch.Generator().manual_seed((sampling.seed or 0) * 7919 + sum(request.prompt_ids) * 31
                                                          + sample)
                length = int(torch.randint(2, sampling.max_new_tokens + 1, (1,), generator=generator))
                tokens = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
                results.append(RolloutResult(index, sample, tokens, [-4.0] * length,
                                             "length" if length == sampling.max_new_tokens else "stop"))
        return results

    def update_weights(self, buckets):
        for _ in buckets:
            self.updates += 1

    def get_weights(self, names):
        return {}


class StandInReward:
    """Score: the share of even tokens in the response text (a list of ids rendered as text)."""

    def score_batch(self, items):
        results = []
        for item in items:
            ids = [int(t) for t in item.response_text.split()]
            share = sum(t % 2 == 0 for t in ids) / max(len(ids), 1)
            results.append(SimpleNamespace(score=share, accuracy=float(share > 0.5), error=None))
        return results

    def metrics(self):
        return {}

    def close(self):
        pass


@dataclass
class StandInDataset:
    """Deterministic prompts for one data-parallel rank, with a resumable position."""

    batch_size: int
    dp_rank: int = 0
    position: int = 0
    skipped: int = field(default=0)

    def prompt(self, index: int) -> SimpleNamespace:
        """The prompt at `index`, with the fields of a data.PromptSample the loop reads."""
        generator = torch.Generator().manual_seed(index)
        ids = torch.randint(0, VOCAB, (PROMPT_LENGTH,), generator=generator).tolist()
        return SimpleNamespace(index=index, prompt_ids=ids, pixel_values=None, image_grid_thw=None, images=[],
                               prompt_text="", ground_truth="", data_source="stand_in", extra_info={}, messages=[],
                               second_per_grid_ts=[])

    def __iter__(self):
        while True:
            batch = []
            for _ in range(self.batch_size):
                batch.append(self.prompt(self.position * 1000 + self.dp_rank))
                self.position += 1
            yield batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def metrics(self):
        return {"data/skipped_total": float(self.skipped)}


def positions(prompt_ids, response_length, image_grid_thw, second_per_grid_ts=()):
    return torch.arange(len(prompt_ids) + response_length).unsqueeze(0).expand(3, -1).clone()


def stand_in_trainer(config, resume: bool = True):
    """A Trainer over the stand-ins with the real roles, optimizer, checkpointer, bridge and tracker."""
    import os

    import torch.distributed as dist
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mmrl_megatron.algorithms import advantage_estimator
    from mmrl_megatron.bridge import WeightBridge
    from mmrl_megatron.parallel import ParallelDims, start_processes
    from mmrl_megatron.trainer.build import build_role
    from mmrl_megatron.trainer.checkpoint import Checkpointer
    from mmrl_megatron.trainer.experience import ExperienceSources
    from mmrl_megatron.trainer.loop import Trainer, TrainerParts
    from mmrl_megatron.trainer.state import TrainerState
    from mmrl_megatron.trainer.tracking import build_tracker

    use_stand_in_logprobs()
    device = torch.device("cpu")
    dims = start_processes(ParallelDims.from_config(config, dist.get_world_size(), None), device)
    model_parallel_cuda_manual_seed(config.trainer.seed)
    actor = build_role("actor", stand_in_model("actor"), config, device, dims, config.actor.optim)
    reference = (build_role("reference", stand_in_model("actor"), config, device, dims) if config.algorithm.kl_coef
                 else None)
    critic = (build_role("critic", stand_in_model("critic", seed=1), config, device, dims, config.critic.optim)
              if advantage_estimator(config.algorithm.advantage).needs_critic else None)
    roles = {"actor": actor, **({"critic": critic} if critic else {})}
    dataset = StandInDataset(config.data.prompts_per_step // dims.data, dims.data_parallel_rank)
    checkpointer = Checkpointer(os.path.join(config.trainer.run_dir, "checkpoints"), roles, TrainerState(), dims,
                                dataset, keep_last=config.trainer.keep_last)
    checkpointer.resume("auto" if resume else "never")
    engine = StandInEngine()

    def export(chunks):
        return [(name, parameter.detach()) for name, parameter in chunks[0].named_parameters()]

    bridge = WeightBridge([getattr(c, "module", c) for c in actor.chunks], engine, 1 << 16, dims, export=export,
                          check_names=False)
    sources = ExperienceSources(prompts=iter(dataset), engine=engine, reward=StandInReward(),
                                decode=lambda ids: " ".join(map(str, ids)), positions=positions, dims=dims)
    tracker = build_tracker(config.logging, config.trainer.run_dir, dist.get_rank() == 0)
    parts = TrainerParts(config=config, device=device, dims=dims, actor=actor, reference=reference, critic=critic,
                         sources=sources, bridge=bridge, pack_sequences=pack_sequences, tracker=tracker,
                         checkpointer=checkpointer, dataset=dataset, parameter_count=1.0)
    return Trainer(parts)


def stand_in_config(run_dir: str, overrides=()):
    from mmrl_megatron.config import load_config

    base = [f"trainer.run_dir={run_dir}", "logging.wandb=false", "logging.console=false", "rollout.n=4",
            "rollout.max_new_tokens=8", "data.prompts_per_step=4", "actor.micro_batch_tokens=40",
            "actor.optim.lr=1e-3", "trainer.steps=3", "algorithm.kl_coef=0.01", "rollout.release_memory=false", "model.dtype=float32"]
    return load_config(None, base + list(overrides))
