"""Model dimensions for memory planning: each family computes them from its parsed config.json
(models/<family>/planner.py; models/planner_dims.py resolves a directory or a name), or the published
shapes built in.

The built-in shapes let the planner answer "does 72B fit on 32 GPUs?" without downloading a checkpoint.
Parameter counts follow the HF modules exactly (biases and norms included), so the count for a real
checkpoint equals the number of elements in its safetensors (tests check this on the tiny checkpoint).
"""
from dataclasses import dataclass, replace
from typing import Dict, Literal


@dataclass(frozen=True)
class LanguageDims:
    """The decoder: GQA (Qwen2) or MLA + mixture of experts (DeepSeek-V3 style, Kimi-VL)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # dense MLP width (all layers of a dense model; the first `first_dense_layers` of an MoE)
    vocab: int
    tied: bool
    attention: Literal["gqa", "mla"] = "gqa"
    q_lora_rank: int = 0  # MLA; 0: a plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    num_experts: int = 0  # 0: dense
    experts_per_token: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0  # all shared experts together
    first_dense_layers: int = 0
    # whether the model's SwiGLU runs megatron-core's fused (compiled) kernel on GPUs: Qwen2.5-VL's builder
    # turns it on, Kimi-VL's experts run it unfused (models/*/build)
    fused_swiglu: bool = True
    qkv_bias: bool = True  # GQA's q/k/v projections carry biases (Qwen2); Qwen3 has none
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys (head_dim weights each; Qwen3)

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts > 0 and index >= self.first_dense_layers

    def attention_params(self) -> int:
        h = self.hidden
        if self.attention == "mla":
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.heads * qk_head if not self.q_lora_rank
                 else h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.heads * qk_head)
            kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + self.heads * self.v_head_dim * h
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # o_proj has no bias
        biases = (q_width + 2 * kv_width) if self.qkv_bias else 0
        norms = 2 * self.head_dim if self.qk_norm else 0
        return h * q_width + 2 * h * kv_width + biases + norms + q_width * h

    def routed_expert_params(self, index: int) -> int:
        return self.num_experts * 3 * self.hidden * self.moe_ffn if self.is_moe_layer(index) else 0

    def layer_params_outside_experts(self, index: int) -> int:
        """Attention, norms, dense MLP or (router + shared experts) of layer `index`."""
        h = self.hidden
        mlp = (self.num_experts * h + self.num_experts + 3 * h * self.shared_ffn if self.is_moe_layer(index)
               else 3 * h * self.ffn)
        return self.attention_params() + mlp + 2 * h

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Key + value cache per token over all layers, as HF-style engines store it (MLA decompressed)."""
        if self.attention == "mla":
            per_layer = self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
        else:
            per_layer = 2 * self.kv_heads * self.head_dim
        return self.layers * per_layer * dtype_bytes


@dataclass(frozen=True)
class VisionDims:
    """The vision tower and its projector into the language model."""

    kind: Literal["qwen2_5_vit", "moonvit"]
    depth: int
    hidden: int
    ffn: int
    heads: int
    patch: int = 14
    merge: int = 2  # spatial merge: merge**2 patches become one language token
    temporal_patch: int = 2  # Qwen's Conv3d frames; MoonViT uses 2-D patches
    pos_emb_cells: int = 0  # MoonViT's learnable 2-D position table (height * width)
    split_over_tensor_parallel: bool = True  # models/qwen2_5_vl splits its tower; models/kimi_vl replicates MoonViT
    final_norm: bool = True  # the LayerNorm kind's norm after the last block (MoonViT has one, Qwen3-VL none)
    postshuffle_mergers: int = 0  # extra patch mergers whose LayerNorm spans the merged width (DeepStack)

    def patch_embed_params(self) -> int:
        """The patch embedding (and MoonViT's position table): replicated even when the tower is split."""
        if self.kind == "qwen2_5_vit":
            return self.hidden * 3 * self.temporal_patch * self.patch ** 2
        return self.hidden * 3 * self.temporal_patch * self.patch ** 2 + self.hidden + self.pos_emb_cells * self.hidden

    def params(self, out_hidden: int) -> int:
        hv, merged = self.hidden, self.hidden * self.merge ** 2
        attention = 3 * hv * hv + 3 * hv + hv * hv + hv
        if self.kind == "qwen2_5_vit":
            mlp = 2 * (hv * self.ffn + self.ffn) + self.ffn * hv + hv  # SwiGLU with biases
            block = attention + mlp + 2 * hv  # two RMSNorms
            merger = hv + merged * merged + merged + merged * out_hidden + out_hidden
            return self.patch_embed_params() + self.depth * block + merger
        mlp = hv * self.ffn + self.ffn + self.ffn * hv + hv  # fc0, GELU, fc1
        block = attention + mlp + 4 * hv  # two LayerNorms (weight + bias)
        linears = merged * merged + merged + merged * out_hidden + out_hidden
        mergers = 2 * hv + linears + self.postshuffle_mergers * (2 * merged + linears)
        return self.patch_embed_params() + self.depth * block + (2 * hv if self.final_norm else 0) + mergers

    def activation_bytes_per_patch(self, tensor_parallel: int) -> float:
        """bf16 bytes one patch keeps for backward in one block on one GPU: norm/linear inputs (full
        width), q/k/v/attention output and the MLP's (split when the tower is tensor-parallel)."""
        # Qwen's fused SwiGLU keeps gate+up (4 B) and fc2 its product (2 B); MoonViT's GELU keeps fc0's output and its own
        mlp = 6 * self.ffn if self.kind == "qwen2_5_vit" else 4 * self.ffn
        split = tensor_parallel if self.split_over_tensor_parallel else 1
        return 2 * (4 * self.hidden) + (2 * (4 * self.hidden) + mlp) / split


@dataclass(frozen=True)
class ModelDims:
    name: str
    language: LanguageDims
    vision: VisionDims

    def language_params(self) -> int:
        lm = self.language
        layers = sum(self.language.layer_params_outside_experts(i) + lm.routed_expert_params(i)
                     for i in range(lm.layers))
        return layers + lm.vocab * lm.hidden * (1 if lm.tied else 2) + lm.hidden

    def vision_params(self) -> int:
        return self.vision.params(self.language.hidden)

    def total_params(self) -> int:
        return self.language_params() + self.vision_params()


_QWEN_VIT_SMALL = VisionDims("qwen2_5_vit", depth=32, hidden=1280, ffn=3420, heads=16)
_QWEN_VIT_LARGE = replace(_QWEN_VIT_SMALL, ffn=3456)  # 32B and 72B widen the ViT MLP


def _qwen(name, layers, hidden, heads, kv_heads, ffn, vocab, tied, vision):
    return ModelDims(name, LanguageDims(layers, hidden, heads, kv_heads, hidden // heads, ffn, vocab, tied), vision)


# Published shapes (Hugging Face config.json of each release; shared/reference/conversion_models.md).
BUILTIN_MODELS: Dict[str, ModelDims] = {
    "qwen2.5-vl-3b": _qwen("qwen2.5-vl-3b", 36, 2048, 16, 2, 11008, 151936, True, _QWEN_VIT_SMALL),
    "qwen2.5-vl-7b": _qwen("qwen2.5-vl-7b", 28, 3584, 28, 4, 18944, 152064, False, _QWEN_VIT_SMALL),
    "qwen2.5-vl-32b": _qwen("qwen2.5-vl-32b", 64, 5120, 40, 8, 27648, 152064, False, _QWEN_VIT_LARGE),
    "qwen2.5-vl-72b": _qwen("qwen2.5-vl-72b", 80, 8192, 64, 8, 29568, 152064, False, _QWEN_VIT_LARGE),
    "kimi-vl-a3b": ModelDims(
        "kimi-vl-a3b",
        LanguageDims(layers=27, hidden=2048, heads=16, kv_heads=16, head_dim=128, ffn=11264, vocab=163840,
                     tied=False, attention="mla", kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                     v_head_dim=128, num_experts=64, experts_per_token=6, moe_ffn=1408, shared_ffn=2 * 1408,
                     first_dense_layers=1, fused_swiglu=False),
        VisionDims("moonvit", depth=27, hidden=1152, ffn=4304, heads=16, temporal_patch=1, pos_emb_cells=64 * 64,
                   split_over_tensor_parallel=False),
    ),
}
