"""The one error type a user sees: a mistake in input, reported as one line and exit code 2."""

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the person running unify-dist: a config, a flag, a path, a dataset.

    The message says what was wrong and what to do. The CLI prints it as one line and exits 2;
    it never becomes a traceback.
    """
