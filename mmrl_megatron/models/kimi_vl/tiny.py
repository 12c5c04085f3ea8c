"""Write a tiny Kimi-VL-architecture checkpoint directory: the tests' fixture.

config.json has the published layout (model_type kimi_vl, a deepseek_v3 text_config, a moonvit
vision_config) and model.safetensors the published names (`language_model.model.*` with per-expert
`mlp.experts.{e}.{gate,up,down}_proj`, `vision_tower.*`, `multi_modal_projector.*`). The language
weights come from transformers' DeepseekV3ForCausalLM initialised with a seed, so its own loader (the
numerical oracle) reads them back; the routing bias is made non-zero so that routing depends on it.
Like a published directory it also holds what the data path reads: a tokenizer (byte-level, with Kimi's
special tokens and the published chat template reduced to what RL prompts use), generation_config.json
with the end-of-turn stop token, and preprocessor_config.json for models/kimi_vl/images.py.
"""
import json
import os

import torch

from ..common.byte_tokenizer import BYTE_TOKENS, byte_level_tokenizer, special_token_id
from ..hf_config import write_hf_config

# Kimi's special tokens in the published tokenizer's id order (there at 163584 onwards, here from 256 on)
SPECIAL_TOKENS = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                  "<|im_middle|>", "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>",
                  "[PAD]"]
BOS_TOKEN_ID, EOS_TOKEN_ID, END_OF_TURN_TOKEN_ID, PAD_TOKEN_ID, MEDIA_PLACEHOLDER_TOKEN_ID = (
    special_token_id(SPECIAL_TOKENS, token) for token in ("[BOS]", "[EOS]", "<|im_end|>", "[PAD]", "<|media_pad|>"))

# Kimi-VL's chat_template.jinja, reduced as the Qwen tiny's is: turns are <|im_{role}|>{role}<|im_middle|>
# content<|im_end|> with no newlines, a default system turn, and the published image placeholder string.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>{% endif %}"
    "{% if message['role'] == 'system' %}<|im_system|>{% elif message['role'] == 'user' %}<|im_user|>"
    "{% elif message['role'] == 'assistant' %}<|im_assistant|>{% endif %}"
    "{{ message['role'] }}<|im_middle|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)

TEXT_DEFAULTS = dict(
    vocab_size=BYTE_TOKENS + len(SPECIAL_TOKENS), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.446,
    scoring_func="sigmoid", topk_method="noaux_tc", rms_norm_eps=1e-5, max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 800000.0}, tie_word_embeddings=False,
    hidden_act="silu", initializer_range=0.05, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
    pad_token_id=PAD_TOKEN_ID,
)
VISION_DEFAULTS = dict(
    patch_size=14, init_pos_emb_height=8, init_pos_emb_width=8, num_attention_heads=4, num_hidden_layers=2,
    hidden_size=32, intermediate_size=64, merge_kernel_size=[2, 2],
)
# The published preprocessor_config.json's keys with a test-sized patch limit (Kimi-VL-A3B-Instruct's is
# reported as 4096); its mean/std of 0.5 are assumed, not read from a published file.
PREPROCESSOR_CONFIG = {
    "image_processor_type": "KimiVLImageProcessor", "processor_class": "KimiVLProcessor", "patch_size": 14,
    "merge_kernel_size": [2, 2], "pad_input": True, "in_token_limit": 256,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def tiny_config_dict(**overrides) -> dict:
    """config.json contents; keyword overrides go to the text config, `vision_<key>` ones to the vision config."""
    text, vision = dict(TEXT_DEFAULTS), dict(VISION_DEFAULTS)
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        else:
            text[key] = value
    return {
        "model_type": "kimi_vl", "architectures": ["KimiVLForConditionalGeneration"],
        "media_placeholder_token_id": MEDIA_PLACEHOLDER_TOKEN_ID, "pad_token_id": text["pad_token_id"],
        "text_config": {"model_type": "deepseek_v3", **text},
        "vision_config": {"model_type": "moonvit", **vision},
    }


def checkpoint_names_from_transformers(state_dict: dict) -> dict:
    """transformers-5 in-memory DeepseekV3 names -> the published per-expert names (fused experts split)."""
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for expert, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                out[f"{prefix}{expert}.gate_proj.weight"] = gate
                out[f"{prefix}{expert}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for expert, weight in enumerate(tensor):
                out[f"{prefix}{expert}.down_proj.weight"] = weight
        else:
            out[name] = tensor
    return out


def tiny_language_state(config_dict: dict, seed: int) -> dict:
    """Published-name language-model tensors (`language_model.` prefix) from a seeded DeepseekV3ForCausalLM."""
    from transformers import DeepseekV3ForCausalLM

    from .hf_config import kimi_vl_config_from_dict

    torch.manual_seed(seed)
    text = kimi_vl_config_from_dict(config_dict).text
    model = DeepseekV3ForCausalLM(text).float()
    generator = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name, tensor in checkpoint_names_from_transformers(model.state_dict()).items():
        if name.endswith("e_score_correction_bias"):
            tensor = 0.1 * torch.randn(tensor.shape, generator=generator)  # routing must depend on the bias
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)  # not all ones: catches swaps
        state[f"language_model.{name}"] = tensor.detach().clone()
    return state


def tiny_vision_state(config_dict: dict, seed: int) -> dict:
    from .hf_config import kimi_vl_config_from_dict
    from .vision import MoonViT, MultiModalProjector

    config = kimi_vl_config_from_dict(config_dict)
    torch.manual_seed(seed + 2)
    tower = MoonViT(config.vision)
    projector = MultiModalProjector(config.vision, config.text.hidden_size)
    generator = torch.Generator().manual_seed(seed + 3)
    state = {}
    for prefix, module in (("vision_tower.", tower), ("multi_modal_projector.", projector)):
        for name, tensor in module.state_dict().items():
            # perturb LayerNorm weights and biases too, so a mis-mapped norm cannot pass unnoticed
            state[prefix + name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
    return state


def build_tokenizer():
    """The tiny checkpoint's tokenizer: byte tokens 0..255, SPECIAL_TOKENS from 256 on, CHAT_TEMPLATE."""
    return byte_level_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE, eos_token="[EOS]", pad_token="[PAD]",
                                bos_token="[BOS]")


def write_data_files(out_dir: str) -> None:
    """Tokenizer, generation_config.json (stop at <|im_end|> or [EOS]) and preprocessor_config.json."""
    from transformers import GenerationConfig

    build_tokenizer().save_pretrained(out_dir)
    GenerationConfig(bos_token_id=BOS_TOKEN_ID, eos_token_id=[END_OF_TURN_TOKEN_ID, EOS_TOKEN_ID],
                     pad_token_id=PAD_TOKEN_ID).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as handle:
        json.dump(PREPROCESSOR_CONFIG, handle, indent=2)


def build_tiny_checkpoint(out_dir: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> str:
    """Write config.json, model.safetensors and the data files for a tiny Kimi-VL into out_dir; returns out_dir."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config_dict = tiny_config_dict(**overrides)
    config_dict["text_config"]["torch_dtype"] = str(dtype).replace("torch.", "")
    state = {**tiny_language_state(config_dict, seed), **tiny_vision_state(config_dict, seed)}
    state = {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    write_hf_config(out_dir, config_dict)
    write_data_files(out_dir)
    return out_dir
