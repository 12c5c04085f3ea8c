class RewardError(ValueError):
    """A reward set-up problem (bad function path, missing reward model input); the message says what to change."""
