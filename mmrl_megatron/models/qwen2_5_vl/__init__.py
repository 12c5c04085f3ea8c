"""Qwen2.5-VL on megatron-core: hf_config (geometry), vision (tower), model (stage module), build."""
