"""Errors a user can fix (missing or corrupt data, a bad config value, an unusable checkpoint).

The `lightning-dq` command prints a `UserError` as one message, without a traceback, and exits with
status 2; any other exception is a bug and keeps its traceback. Each subclass is also the built-in
exception callers already catch (`ValueError`, `FileNotFoundError`), so `except ValueError` still works.
Messages name the file, key or value and say what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: an expected failure caused by input the user controls."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (names the key, the value and the accepted range)."""


class DataError(UserError, ValueError):
    """Dataset files that are corrupt, truncated, of the wrong format or version (names the file)."""


class DataNotFoundError(UserError, FileNotFoundError):
    """Dataset files that are missing (names the directory and the files expected there)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is truncated, corrupt or from a different model configuration (names the file)."""
