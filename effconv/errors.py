class EffconvError(Exception):
    """An error caused by user input; the CLI prints its message as one line and exits non-zero."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line of at most 300 characters, for `effconv: error: ...`."""
    message = " ".join(str(error).split()) or type(error).__name__
    return message if len(message) <= 300 else message[:297] + "..."
