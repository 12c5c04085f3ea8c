import pytest

from mmrl_megatron.models.kimi_vl import tiny as kimi_vl_tiny
from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL directory (tokenizer with chat template, 14-px patches, merge 2, max 112x112 pixels)."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen2_5_vl")))


@pytest.fixture(scope="session")
def tiny_kimi_vl_dir(tmp_path_factory):
    """A tiny Kimi-VL directory (Kimi's chat template and special tokens, 14-px patches, 2x2 merge, 256-patch limit)."""
    return kimi_vl_tiny.build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_kimi_vl")))
