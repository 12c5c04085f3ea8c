"""Write a tiny Qwen3-VL-architecture checkpoint directory: the tests' fixture and a demo model.

Same directory layout as a published checkpoint (config.json, model.safetensors, tokenizer with a chat
template, preprocessor_config.json). The tokenizer and template are Qwen's (models/common/qwen_chat.py):
Qwen3-VL uses the same special tokens and image markup as Qwen2.5-VL.
"""
import json
import os

import torch

from ..common.qwen_chat import build_byte_tokenizer

# head_dim 16 with sections (3, 3, 2): the interleaved layout (t h w t h w t h) differs from the sectioned
# one (t t t h h h w w) in most channels, so a port using megatron's sectioned M-RoPE fails parity
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2],
                             "mrope_interleaved": True})
# a 4 x 4 learned position grid, resampled to every image's grid; DeepStack from blocks 0 and 2
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
              deepstack_visual_indexes=[0, 2])


def tiny_config(tokenizer, **overrides):
    """A Qwen3VLConfig with test-sized widths; keyword overrides go to the text config, `vision_*` to the vision
    config; the special token ids are the tokenizer's."""
    from transformers import Qwen3VLConfig

    text, vision = dict(TEXT, vocab_size=len(tokenizer)), dict(VISION)
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        else:
            text[key] = value
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text.update(eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                         **ids)


def write_preprocessor_config(out_dir: str, config, min_pixels: int = 64 * 64, max_pixels: int = 128 * 128) -> None:
    """Qwen3-VL's image processor is Qwen2-VL's with patch 16 (so resizing to multiples of 32)."""
    vision = config.vision_config
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as handle:
        json.dump({
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
            "min_pixels": min_pixels, "max_pixels": max_pixels,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
            "merge_size": vision.spatial_merge_size,
        }, handle, indent=2)


def build_tiny_checkpoint(out_dir: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> str:
    """Write a randomly initialised tiny Qwen3-VL to out_dir and return out_dir."""
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = build_byte_tokenizer()
    config = tiny_config(tokenizer, **overrides)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(dtype)
    with torch.no_grad():  # transformers initialises norms to ones/zeros: random ones make the port's mistakes show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_preprocessor_config(out_dir, config)
    return out_dir
