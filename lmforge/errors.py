"""The exceptions lmforge raises at the boundaries where bad input enters.

Each one carries a message that names the offending file or field and what was expected, so the
CLI can print it as is (no traceback) and a library user can catch a specific class.
"""


class LmforgeError(Exception):
    """Base class of every error lmforge raises on purpose."""


class ConfigError(LmforgeError, ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


class InputError(LmforgeError, ValueError):
    """Input (a corpus file, a glob, a built-in name, token ids) is missing, empty or malformed."""


class TokenizerFileError(LmforgeError, ValueError):
    """A tokenizer file is missing, corrupt, of an unknown version, or of a foreign format."""


class TrainingInterrupted(LmforgeError):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint at the current step."""


class TaskFailed(LmforgeError):
    """A task of a long job could not finish (its worker process died); what the job finished
    is kept, and rerunning the same command resumes from it."""
