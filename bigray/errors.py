"""Errors a user can act on: the CLI prints these as one paragraph, without a traceback."""


class BigrayError(Exception):
    """Base class for errors caused by config, input or environment rather than a bigray bug."""


class ConfigError(BigrayError):
    """The config is invalid or lacks a value the command needs."""


class DataError(BigrayError):
    """Input data is missing, unreadable or empty."""
