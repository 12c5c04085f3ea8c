"""The conversion and checkpoint errors, and how a failure inside torch's checkpoint reader is told in one line."""


class CheckpointError(Exception):
    """A checkpoint does not fit the model: the message names the file, key or tensor and what to do."""


def one_line(error: BaseException) -> str:
    """A load failure in one line; for torch's CheckpointException (every rank's tracebacks), the first
    failing rank's exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    prefix = ""
    if isinstance(error, CheckpointException) and error.failures:
        rank, failure = min(error.failures.items(), key=lambda item: item[0])
        prefix, error = f"rank {rank}: ", failure[0] if isinstance(failure, tuple) else failure
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{prefix}{type(error).__name__}: {text[:600]}"
