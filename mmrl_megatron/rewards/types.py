from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional


class RewardItem(NamedTuple):
    """One response to score. The first four fields are verl's compute_score arguments; a plain 4-tuple works
    too. `messages` (the prompt's chat with image parts) and `images` (encoded bytes) are needed only by a
    reward model."""
    data_source: str
    response_text: str
    ground_truth: Any
    extra_info: Optional[Dict[str, Any]] = None
    messages: Optional[List[Dict[str, Any]]] = None
    images: Optional[List[bytes]] = None


@dataclass
class RewardResult:
    """score: the total reward; accuracy: 1.0 when the answer function judged the answer correct; error: why the
    answer function gave nothing (exception or timeout; score then excludes it); components: each part's value."""
    score: float
    accuracy: float
    error: Optional[str] = None
    components: Dict[str, float] = field(default_factory=dict)
