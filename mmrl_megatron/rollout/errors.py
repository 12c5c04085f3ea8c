class RolloutError(RuntimeError):
    """A rollout backend failed; the message names the server, request or tensor and what to do."""
