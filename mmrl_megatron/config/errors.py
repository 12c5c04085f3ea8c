class ConfigError(ValueError):
    """A configuration problem, raised before anything is built; the message names the key and the fix."""
