from .naive import linear_decode_step_ref, naive_linear_attention, recurrent_linear_attention_ref
from .torch_chunk import chunk_linear_attention_ref

__all__ = ["naive_linear_attention", "recurrent_linear_attention_ref", "linear_decode_step_ref",
           "chunk_linear_attention_ref"]
# Triton versions: effconv_kernels.linear_attn.chunk / .recurrent (imported lazily, they need triton)
