"""A tiny real tokenizer for fast tests (no downloads).

``make_tiny_tokenizer()`` trains a byte-level BPE in memory on a few sentences, so it can encode
any text (unknown words fall back to bytes) and decoding round-trips. It has ``<s>`` (BOS),
``</s>`` (EOS), ``<pad>`` and ``<unk>`` special tokens and a small ChatML-like chat template.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3

#: Chat template: every turn is "<s>role\ncontent</s>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)

TRAINING_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Linear attention replaces softmax with a kernel feature map.",
    "Explain why the sky is blue in simple terms.",
    "Write a short story about a robot who learns to paint.",
    "def add(a, b):\n    return a + b\n",
    "A train travels 60 miles per hour for 2.5 hours. How far does it go?",
    "user assistant system hello world the a of and to in is it",
]


def make_tiny_tokenizer(tmp_path: Path | None = None, *, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with BOS/EOS/PAD/UNK and a chat template.

    With ``tmp_path`` the tokenizer is also saved there (``save_pretrained``) and reloaded with
    ``AutoTokenizer.from_pretrained(tmp_path)``, for tests that need a tokenizer directory.
    """
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_SENTENCES * 4, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if tmp_path is None:
        return tokenizer
    tmp_path = Path(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)
