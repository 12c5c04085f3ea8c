"""The published dense Qwen3-VL checkpoints by name, as the config.json fields geometry.read_geometry reads,
so the memory planner sizes them without a download (models/planner_dims.py; `--model Qwen/Qwen3-VL-8B-Instruct`).

shared/reference/ has no Qwen3-VL geometry; the values are those of the Hugging Face config.json of
Qwen/Qwen3-VL-2B-Instruct, -4B-Instruct, -8B-Instruct and -32B-Instruct (hub layout: rope_scaling +
rope_theta inside text_config). All four share vocab_size 151936, head_dim 128, rope_theta 5,000,000,
interleaved mrope_section [24, 20, 20], and a vision tower of patch 16 with a 48 x 48 learned position grid;
2B and 4B tie the output layer to the embedding. transformers' Qwen3VLForConditionalGeneration built from
these configs counts 2.13 B, 4.44 B, 8.77 B and 33.36 B parameters (the hub lists 8.77 B for the 8B checkpoint).
"""
from typing import Dict, Sequence

# Qwen's special-token ids, the same in every Qwen3-VL checkpoint
TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653)


def _config(hidden: int, ffn: int, layers: int, heads: int, tied: bool, vision_depth: int, vision_hidden: int,
            vision_ffn: int, deepstack: Sequence[int]) -> dict:
    text = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                max_position_embeddings=262144, rope_theta=5000000,
                rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                tie_word_embeddings=tied, attention_bias=False)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_ffn, num_heads=16,
                  out_hidden_size=hidden, patch_size=16, temporal_patch_size=2, in_channels=3, spatial_merge_size=2,
                  num_position_embeddings=2304, deepstack_visual_indexes=list(deepstack),
                  hidden_act="gelu_pytorch_tanh")
    return dict(model_type="qwen3_vl", text_config=text, vision_config=vision, tie_word_embeddings=tied, **TOKEN_IDS)


NAMED_SHAPES: Dict[str, dict] = {
    "qwen3-vl-2b": _config(2048, 6144, 28, 16, True, 24, 1024, 4096, (5, 11, 17)),
    "qwen3-vl-4b": _config(2560, 9728, 36, 32, True, 24, 1024, 4096, (5, 11, 17)),
    "qwen3-vl-8b": _config(4096, 12288, 36, 32, False, 27, 1152, 4304, (8, 16, 24)),
    "qwen3-vl-32b": _config(5120, 25600, 64, 64, False, 27, 1152, 4304, (8, 16, 24)),
}
