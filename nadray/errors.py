"""User-facing errors.

Every error a user can cause (a bad file, row, config key or request) is a
``NadrayError`` whose message names the thing (file, row, field or key), the rule
and the value received. The CLI prints it as one line and exits non-zero; it
never shows a traceback for these.
"""

from __future__ import annotations


class NadrayError(Exception):
    """A problem with the user's input, config or environment, explained in one line."""


class ConfigError(NadrayError):
    """An unknown config key or a value that breaks its rule."""


class InputError(NadrayError):
    """An input file or object that cannot be read at all."""


class ModelError(NadrayError):
    """A model reference that does not resolve, or a checkpoint that fails validation."""


class StorageError(NadrayError, OSError):
    """A storage location (an S3 endpoint, usually) that cannot be reached: names the URI.

    Also an ``OSError``, so code that already treats unreadable files as user
    errors (``except OSError``) handles an outage the same way.
    """

    def __init__(self, uri: str, message: str):
        super().__init__(message)
        self.uri = uri
