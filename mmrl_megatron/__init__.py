"""mmrl_megatron: reinforcement learning for vision-language models on megatron-core."""
