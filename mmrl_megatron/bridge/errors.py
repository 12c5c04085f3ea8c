class BridgeError(RuntimeError):
    """A weight sync went wrong; the message names the tensor and what to check."""
