"""The project's base error: a configuration value is invalid (the message names the field)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""
