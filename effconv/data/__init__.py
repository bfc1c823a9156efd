"""Training text: loading (corpus), teacher generation (teacher_text), packing and batching (packing)."""

from .corpus import HF_PREFIX, load_texts
from .packing import BlockLoader, pack_texts, split_train_val
from .prepare import prepare_data
from .teacher_text import (
    GENERATION_MODES,
    TeacherSample,
    check_generation_mode,
    generate_teacher_samples,
    generate_teacher_texts,
    load_default_prompts,
    resolve_generation_mode,
)

__all__ = [
    "BlockLoader", "GENERATION_MODES", "HF_PREFIX", "TeacherSample", "check_generation_mode",
    "generate_teacher_samples", "generate_teacher_texts", "load_default_prompts", "load_texts", "pack_texts",
    "prepare_data", "resolve_generation_mode", "split_train_val",
]
