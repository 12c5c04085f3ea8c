"""Write a tiny Qwen2.5-VL-architecture checkpoint directory: the demo's model and the tests' fixture.

The directory has what a published checkpoint has (config.json, model.safetensors, tokenizer files
with a chat template, preprocessor_config.json), so every loading path runs on it unchanged. The
tokenizer is byte-level plus Qwen's special tokens and chat template (models/common/qwen_chat.py).
"""
import json
import os
from typing import Optional

import torch

from ..common.qwen_chat import build_byte_tokenizer


def tiny_config(tokenizer, **overrides):
    """A Qwen2_5_VLConfig with test-sized widths; keyword overrides go to the text config, `vision_*` to the vision config."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                  tokens_per_second=2)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                tie_word_embeddings=True, rms_norm_eps=1e-6)
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        else:
            text[key] = value
    return config_with_tokenizer_ids(text, vision, tokenizer)


def config_with_tokenizer_ids(text: dict, vision: dict, tokenizer):
    """A Qwen2_5_VLConfig whose special token ids (image pad, vision start/end, eos, pad) are the
    tokenizer's, so a directory holding both is consistent whatever the vocabulary size."""
    from transformers import Qwen2_5_VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
            ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>")]}
    text = dict(text, bos_token_id=None, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"], **ids)


def write_preprocessor_config(out_dir: str, config, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> None:
    vision = config.vision_config
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as handle:
        json.dump({
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True, "min_pixels": min_pixels, "max_pixels": max_pixels,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
            "merge_size": vision.spatial_merge_size,
        }, handle, indent=2)


def build_tiny_checkpoint(out_dir: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                          min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, config=None, **overrides) -> str:
    """Write a randomly initialised tiny Qwen2.5-VL to out_dir and return out_dir."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_byte_tokenizer()
    config = config or tiny_config(tokenizer, **overrides)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_preprocessor_config(out_dir, config, min_pixels, max_pixels)
    return out_dir


def load_tiny_tokenizer(path: Optional[str] = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path) if path else build_byte_tokenizer()
