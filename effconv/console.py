"""The one console effconv logs to (stderr, so stdout stays free for reports)."""

import contextlib
from collections.abc import Iterator

from rich.console import Console

console = Console(stderr=True)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings for a block (e.g. "sequence longer than model_max_length": effconv cuts its
    own blocks)."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)
