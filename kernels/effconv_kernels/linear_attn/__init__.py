from .naive import (
    linear_decode_step_ref, linear_state, naive_gated_linear_attention, naive_linear_attention,
    recurrent_linear_attention_ref,
)

__all__ = ["naive_linear_attention", "naive_gated_linear_attention", "recurrent_linear_attention_ref",
           "linear_decode_step_ref", "linear_state"]
# Triton versions: effconv_kernels.linear_attn.chunk / .recurrent (imported lazily, they need triton).
# The chunked PyTorch formulation lives in effconv/modeling/attention_ops.py (not duplicated here).
