"""The weight bridge: the actor's megatron shards -> HF-named full tensors -> buckets -> a rollout engine."""
from .buckets import bucket_by_bytes
from .errors import BridgeError
from .refit_check import RefitProbe, check_refit
from .weight_bridge import SyncStats, WeightBridge

__all__ = ["BridgeError", "RefitProbe", "SyncStats", "WeightBridge", "bucket_by_bytes", "check_refit"]
