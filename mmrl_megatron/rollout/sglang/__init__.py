"""SGLang rollout backend (pinned sglang 0.5.23): server launch, HTTP client, weight sync, recovery."""
from .engine import SGLangEngine
from .protocol import PINNED_SGLANG_VERSION

__all__ = ["SGLangEngine", "PINNED_SGLANG_VERSION"]
