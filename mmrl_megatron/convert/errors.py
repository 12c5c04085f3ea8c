class CheckpointError(Exception):
    """A checkpoint does not fit the model: the message names the file, key or tensor and what to do."""
