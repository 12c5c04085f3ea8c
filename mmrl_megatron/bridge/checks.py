"""Checks that a weight sync did what it claims: names the engine knows, tensors equal to the actor's."""
from typing import Dict, List, Optional, Sequence

import torch

from ..rollout.engine import RolloutEngine
from ..rollout.errors import RolloutError
from .errors import BridgeError

NAME_CHECK_BATCH = 64  # names per get_weights call: bounds the host memory the check copies at once


def spread_sample(names: Sequence[str], count: Optional[int]) -> List[str]:
    """`count` names spread evenly over `names` (first and last included); all of them when count is None."""
    if count is None or count >= len(names):
        return list(names)
    if count <= 0:
        return []
    if count == 1:
        return [names[0]]
    step = (len(names) - 1) / (count - 1)
    return list(dict.fromkeys(names[round(i * step)] for i in range(count)))


def _names_present(engine: RolloutEngine, names: Sequence[str]) -> set:
    try:
        return set(engine.get_weights(names))
    except (KeyError, RolloutError):
        # Some engines refuse a whole request for one unknown name; ask name by name to find which.
        present = set()
        for name in names:
            try:
                present.update(engine.get_weights([name]))
            except (KeyError, RolloutError):
                pass
        return present


def check_names_known(engine: RolloutEngine, names: Sequence[str]) -> None:
    """Raise BridgeError unless the engine has a tensor under every name in `names`.

    SGLang's load_weights silently skips names it does not know, so a wrong prefix would leave
    stale weights in the engine without any error; this turns that into a loud failure."""
    unknown = []
    for start in range(0, len(names), NAME_CHECK_BATCH):
        batch = list(names[start:start + NAME_CHECK_BATCH])
        present = _names_present(engine, batch)
        unknown.extend(name for name in batch if name not in present)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise BridgeError(f"the engine has no tensor named {shown}: it would silently skip these during a weight "
                          f"sync; check the convert/ rule table's HF names against the engine's model")


def compare_with_engine(expected: Dict[str, torch.Tensor], actual: Dict[str, torch.Tensor]) -> None:
    """Raise BridgeError naming the first tensor whose engine copy is missing or not bit-equal.

    The actor's tensor is cast to the engine's dtype first: the engine stores what it was sent,
    cast to its own precision, so the cast copy is what it must hold exactly."""
    for name, want in expected.items():
        have = actual.get(name)
        if have is None:
            raise BridgeError(f"engine tensor {name} is missing after the weight sync")
        if tuple(have.shape) != tuple(want.shape):
            raise BridgeError(f"engine tensor {name} has shape {tuple(have.shape)}, the actor's converted tensor "
                              f"has {tuple(want.shape)}")
        want = want.to(device="cpu", dtype=have.dtype)
        have = have.cpu()
        if not torch.equal(have, want):
            difference = (have.double() - want.double()).abs()
            raise BridgeError(f"engine tensor {name} differs from the actor's after the weight sync: "
                              f"{int((difference > 0).sum())} of {difference.numel()} elements, max abs difference "
                              f"{difference.max().item():.3e}")
