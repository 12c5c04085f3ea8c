class ModelError(Exception):
    """Inputs or options a model cannot take: the message names the argument and what to do."""
