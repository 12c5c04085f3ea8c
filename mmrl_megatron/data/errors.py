from mmrl_megatron.models.common.media import SkippedRow  # noqa: F401 (raised by the families' processors too)


class DataError(ValueError):
    """A dataset that cannot be used (missing file or column, no usable rows); the message names the file and the fix."""
