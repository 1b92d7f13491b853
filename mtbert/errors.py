"""Errors that reach the user as one line and an exit code, never a traceback."""


class MtbertError(Exception):
    """Base of every error the CLI reports as one line.

    `exit_code` follows the README's "Output and exit codes": 2 for bad input (option,
    key, value, file, spec), 1 for a run that failed.
    """

    exit_code = 2


class ConfigError(MtbertError):
    """A config key, value or file is invalid."""


class DataError(MtbertError):
    """A data file is missing or lacks a required column."""


class EncoderError(MtbertError):
    """An encoder checkpoint cannot be resolved or does not fit the model."""


class ResumeStateError(MtbertError):
    """A run's resume state (resume.pt) is not one mtbert wrote, or is damaged."""


class TrainingError(MtbertError):
    """A run started but could not finish (NaN loss, out of memory, ...)."""

    exit_code = 1
