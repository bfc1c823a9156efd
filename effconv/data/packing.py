"""Token blocks for training: packing documents, the train/validation split and resumable batches.

    texts  = load_texts("corpus.jsonl")                 # or generate_teacher_texts(teacher, ...)
    blocks = pack_texts(texts, tokenizer, seq_len)      # LongTensor [N, seq_len]
    train, val = split_train_val(blocks)
    loader = BlockLoader(train, batch_size, seed)       # loader.batch(step) -> [batch_size, seq_len]

Nothing here downloads anything unless the user asks for an ``hf:`` dataset; by default the training text is
written by the teacher model itself.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..console import quiet_transformers
from ..errors import EffconvError


def mix_seed(seed: int, index: int) -> int:
    """A 63-bit seed derived from (seed, index), so nearby pairs give unrelated streams."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------
# Packing, splitting, batching
# --------------------------------------------------------------------------------------------


PACKING_MODES = ("stream", "documents")


def _document_ids(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """Each document as ``[BOS] tokens [EOS]``: BOS only if the tokenizer has one and the text does not already
    start with it, EOS only if the tokenizer has one and the text does not already end with it."""
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    documents = [text for text in texts if text]
    if not documents:
        return []
    with quiet_transformers():
        encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    out = []
    for ids in encoded:
        if not ids:
            continue
        ids = list(ids)
        if bos_id is not None and ids[0] != bos_id:
            ids.insert(0, bos_id)
        if eos_id is not None and ids[-1] != eos_id:
            ids.append(eos_id)
        out.append(ids)
    return out


def pack_texts(texts: list[str], tokenizer: Any, seq_len: int, packing: str = "stream") -> torch.LongTensor:
    """Tokenize documents and cut them into a ``[N, seq_len]`` LongTensor of blocks.

    "stream": the documents are concatenated and cut into contiguous, non-overlapping blocks (a block may span
    documents; the ragged tail is dropped). "documents": a block never crosses a document boundary, so a
    recurrent state never carries one document into another: each document is cut into whole blocks on its own,
    and documents shorter than ``seq_len`` and each document's tail are left out. No special tokens are added
    besides a missing BOS / EOS per document.
    """
    if seq_len < 1:
        raise EffconvError(f"seq_len must be at least 1, got {seq_len}")
    if packing not in PACKING_MODES:
        raise EffconvError(f"--packing must be one of {', '.join(PACKING_MODES)}, got {packing!r}")
    documents = _document_ids(texts, tokenizer)
    if packing == "documents":
        blocks = [ids[i : i + seq_len] for ids in documents for i in range(0, len(ids) - seq_len + 1, seq_len)]
        if not blocks:
            longest = max((len(ids) for ids in documents), default=0)
            raise EffconvError(
                f"not enough long text: no document has {seq_len} tokens (the longest has {longest}); with --packing "
                "documents every block is one document's; use longer documents (e.g. --generation-turns), a "
                "shorter --seq-len or --packing stream")
        return torch.tensor(blocks, dtype=torch.long)
    stream = [token for ids in documents for token in ids]
    num_blocks = len(stream) // seq_len
    if num_blocks == 0:
        raise EffconvError(
            f"not enough text: {len(stream)} tokens found, at least {seq_len} needed for one block of seq_len {seq_len}"
        )
    return torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


def split_train_val(
    blocks: torch.Tensor, val_fraction: float = 0.05, *, seed: int = 0, min_val_blocks: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle blocks deterministically (by ``seed``) and split off a validation set.

    The validation set has ``round(N * val_fraction)`` blocks but at least ``min_val_blocks``;
    at least one block must remain for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise EffconvError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if min_val_blocks < 0:
        raise EffconvError(f"min_val_blocks must be non-negative, got {min_val_blocks}")
    num_blocks = blocks.shape[0]
    num_val = max(min_val_blocks, round(num_blocks * val_fraction))
    if num_blocks - num_val < 1:
        raise EffconvError(
            f"not enough text to split: {num_blocks} blocks, need at least {num_val + 1} "
            f"({num_val} for validation and 1 for training); add text or shorten seq_len"
        )
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).to(blocks.device)
    shuffled = blocks[order]
    return shuffled[num_val:], shuffled[:num_val]


class BlockLoader:
    """Deterministic, resumable batches over a ``[N, T]`` block tensor.

    The sample stream is an endless sequence of epochs, each a permutation of the blocks seeded
    by ``(seed, epoch)``. ``batch(step)`` returns samples ``step * batch_size`` to
    ``(step + 1) * batch_size - 1`` of that stream, so it depends only on ``step``: a resumed run
    gets exactly the batches the original run would have seen. Batches may span an epoch boundary.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        if blocks.ndim != 2 or blocks.shape[0] == 0:
            raise EffconvError(f"BlockLoader needs a non-empty [N, T] tensor, got shape {tuple(blocks.shape)}")
        if batch_size < 1:
            raise EffconvError(f"batch_size must be at least 1, got {batch_size}")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self._permutations: dict[int, torch.Tensor] = {}

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1]

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps_per_epoch(self) -> float:
        return self.num_blocks / self.batch_size

    def epoch(self, step: int) -> int:
        """The epoch in which ``step``'s batch starts."""
        return step * self.batch_size // self.num_blocks

    def batch(self, step: int) -> torch.Tensor:
        """The ``[batch_size, T]`` batch for global step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        first = step * self.batch_size
        indices = [
            self._permutation(position // self.num_blocks)[position % self.num_blocks]
            for position in range(first, first + self.batch_size)
        ]
        return self.blocks[torch.stack(indices).to(self.blocks.device)]

    def _permutation(self, epoch: int) -> torch.Tensor:
        permutation = self._permutations.get(epoch)
        if permutation is None:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            permutation = torch.randperm(self.num_blocks, generator=generator)
            if len(self._permutations) >= 4:  # a batch touches at most a few consecutive epochs
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = permutation
        return permutation
