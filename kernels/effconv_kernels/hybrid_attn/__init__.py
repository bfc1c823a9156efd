from .cache import HybridDecodeCache
from .naive import hybrid_decode_step_ref, naive_hybrid_attention, recurrent_hybrid_attention_ref

__all__ = ["HybridDecodeCache", "naive_hybrid_attention", "hybrid_decode_step_ref", "recurrent_hybrid_attention_ref"]
# Triton versions: effconv_kernels.hybrid_attn.fused / .recurrent (imported lazily, they need triton).
# The chunked PyTorch formulation lives in effconv/modeling/attention_ops.py (not duplicated here).
