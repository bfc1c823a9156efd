class EffconvError(Exception):
    """An error caused by user input; the CLI prints its message as one line and exits non-zero."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line of at most 300 characters, for `effconv: error: ...`."""
    message = " ".join(str(error).split()) or type(error).__name__
    return message if len(message) <= 300 else message[:297] + "..."


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(error: BaseException) -> bool:
    """Whether an exception means the device or the host ran out of memory (CUDA OOM, MemoryError, or a
    RuntimeError saying so)."""
    import torch

    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MARKERS)
