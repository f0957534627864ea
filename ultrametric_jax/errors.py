"""The project's user-facing errors. Every command prints these as one line and exits with 2;
anything else that escapes is a bug and keeps its traceback."""


class UserError(Exception):
    """Something the user can fix: a bad argument, config value or input file."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field."""


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be read as asked (missing or damaged file, missing tensor, wrong
    shape, unsupported architecture); the message names the file and the tensor."""
