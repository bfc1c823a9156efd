class EffconvError(Exception):
    """An error caused by user input; the CLI prints its message as one line and exits non-zero."""
