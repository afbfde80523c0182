"""Errors that the CLI reports as one line (no traceback) with a non-zero exit."""


class CacError(Exception):
    """A user-facing error: bad spec, missing data, unknown preset, NaN loss..."""
