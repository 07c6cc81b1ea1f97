"""The one exception type for user errors: the CLI prints its message on one line, no traceback."""


class HyperloopError(Exception):
    """Bad input or an impossible request. The message says what is wrong and what to do."""
