"""Errors the CLI reports as one line, without a traceback."""


class TestbedError(Exception):
    """A failure the user can act on; its message says what and how."""
