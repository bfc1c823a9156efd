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


def disk_write_reason(error: BaseException) -> str | None:
    """Why a write failed when the file system refused it (a full disk, a read-only mount, no permission), in the
    system's words; None for any other error. safetensors reports a full disk as its own error naming os error 28."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    if "No space left on device" in text or "os error 28" in text:
        return "No space left on device"
    return None


def failure_line(error: BaseException) -> str:
    """The one line `effconv: error: ...` says for a failure: a user error's own message, out of memory with what to
    lower, a file-system error in the system's words with its path, anything else as unexpected with its type."""
    if isinstance(error, EffconvError):
        return str(error)
    if is_oom(error):
        return "out of memory; lower --batch-size or --seq-len"
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where} (rerun with --debug for the traceback)"
    return f"unexpected {type(error).__name__}: {one_line(error)} (rerun with --debug for the traceback)"
