from .naive import naive_sliding_window_attention, sliding_window_block_list

__all__ = ["naive_sliding_window_attention", "sliding_window_block_list"]
# Triton version: effconv_kernels.sparse_window.triton (imported lazily, it needs triton)
