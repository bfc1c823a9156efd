"""Triton MoE experts (work in progress: routes to the sorted PyTorch reference until the kernels land)."""
from .naive import sorted_moe_experts as triton_moe_experts  # noqa: F401
