"""Qwen3-VL (dense) on megatron-core: geometry (config.json), rotary (interleaved M-RoPE), vision (tower and
DeepStack mergers), deepstack (feature injection into the first decoder layers), specs, model (stage module),
build, conversion (HF <-> Megatron rule table), positions (get_rope_index), tiny (test checkpoint)."""
