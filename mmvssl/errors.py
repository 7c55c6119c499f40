"""User-facing errors: the CLI prints their message as one line, without a traceback."""

import re


class MmvsslError(Exception):
    """An error caused by the user's input (file, config, command line); the message says what."""


class ConfigError(MmvsslError):
    """A config file or override that does not fit the schema."""


def one_line(error: BaseException) -> str:
    """The error's own message on one line. An exception raised in a DataLoader worker reaches the
    main process re-raised by torch with "Caught X in DataLoader worker process N. Original
    Traceback ..." and the whole worker traceback as its message; its last line holds the message."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = re.sub(r"^[\w.]+: ", "", last, count=1)  # "mmvssl.errors.MmvsslError: message"
    return " ".join(text.split())
