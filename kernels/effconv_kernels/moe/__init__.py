"""Mixture-of-experts SwiGLU experts: per-expert loop oracle (naive.py), sorted PyTorch reference
(naive.py), Triton sort/permute + grouped GEMM forward and backward (triton.py)."""
