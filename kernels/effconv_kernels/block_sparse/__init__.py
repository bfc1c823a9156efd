from .naive import block_sparse_mask, naive_block_sparse_attention, select_key_blocks

__all__ = ["block_sparse_mask", "naive_block_sparse_attention", "select_key_blocks"]
# Triton version: effconv_kernels.block_sparse.triton (imported lazily, it needs triton)
