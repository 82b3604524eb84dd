"""Exceptions that carry a message meant for the user (the CLI prints them on one line)."""

from __future__ import annotations


class FastnnError(Exception):
    """Base class of every error fastnn raises on purpose."""


class ConfigError(FastnnError, ValueError):
    """An option has a bad value; the message names the valid choices or range."""


class DataError(FastnnError, ValueError):
    """A data file is missing, corrupt or inconsistent; the message names the file."""


class MissingDependency(FastnnError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""


class BackendUnavailable(MissingDependency):
    """A backend cannot load; the message says what to install."""


class CheckpointError(FastnnError, ValueError):
    """A checkpoint cannot be read or does not match the run resuming from it."""
