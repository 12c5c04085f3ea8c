"""verl-format parquet prompts for vision-language RL: parsing, image and video processing, M-RoPE positions."""
from mmrl_megatron.data.dataset import PromptDataset
from mmrl_megatron.data.errors import DataError
from mmrl_megatron.data.processor import PromptProcessor
from mmrl_megatron.data.types import PromptSample
from mmrl_megatron.models.common.rope import rope_positions

__all__ = ["DataError", "PromptDataset", "PromptProcessor", "PromptSample", "rope_positions"]
