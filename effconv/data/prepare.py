"""The one call that prepares a command's training data: load or generate text, pack it, split it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .corpus import load_texts
from .packing import pack_texts, split_train_val
from .teacher_text import generate_teacher_texts



def prepare_data(
    spec: str | None,
    tokenizer: Any,
    seq_len: int,
    *,
    teacher_factory: Callable[[], tuple[Any, Any]],
    num_tokens: int,
    cache_dir: Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    max_documents: int | None = None,
    max_new_tokens: int = 256,
    generation_batch_size: int = 16,
    generation_mode: str = "auto",
    generation_turns: int = 1,
    packing: str = "stream",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Load or generate training text and return ``(train_blocks, val_blocks, description)``.

    With ``spec`` None the teacher from ``teacher_factory()`` (called only then) writes about
    ``num_tokens`` tokens of responses (cached in ``cache_dir``; ``generation_mode`` as in
    :func:`generate_teacher_samples`); otherwise ``spec`` is read with
    :func:`load_texts` (long text files kept whole with ``packing`` "documents"). Text is packed with ``tokenizer``
    into blocks of ``seq_len`` tokens (``packing`` as in :func:`pack_texts`).
    """
    if spec is None:
        teacher_model, teacher_tokenizer = teacher_factory()
        texts = generate_teacher_texts(
            teacher_model,
            teacher_tokenizer,
            num_tokens=num_tokens,
            cache_dir=cache_dir,
            max_new_tokens=max_new_tokens,
            batch_size=generation_batch_size,
            seed=seed,
            progress=progress,
            generation_mode=generation_mode,
            turns=generation_turns,
        )
        kind = f"{generation_turns}-turn teacher conversations" if generation_turns > 1 else "teacher-generated texts"
        source = f"{len(texts):,} {kind}"
    else:
        texts = load_texts(spec, text_field=text_field, max_documents=max_documents,
                           split_long=packing == "stream")
        source = f"{len(texts):,} documents from {spec}"

    blocks = pack_texts(texts, tokenizer, seq_len, packing)
    train_blocks, val_blocks = split_train_val(blocks, val_fraction, seed=seed)
    description = (
        f"{source}: {blocks.numel():,} tokens in {blocks.shape[0]:,} blocks of {seq_len}"
        f"{' within documents' if packing == 'documents' else ''} "
        f"({train_blocks.shape[0]:,} train, {val_blocks.shape[0]:,} validation)"
    )
    return train_blocks, val_blocks, description
