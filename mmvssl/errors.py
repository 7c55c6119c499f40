"""User-facing errors: the CLI prints their message as one line, without a traceback."""


class MmvsslError(Exception):
    """An error caused by the user's input (file, config, command line); the message says what."""


class ConfigError(MmvsslError):
    """A config file or override that does not fit the schema."""
