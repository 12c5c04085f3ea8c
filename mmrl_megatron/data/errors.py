class DataError(ValueError):
    """A dataset that cannot be used (missing file or column, no usable rows); the message names the file and the fix."""


class SkippedRow(Exception):
    """One row that cannot be used; `reason` is the counter it is reported under, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
