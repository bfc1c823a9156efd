"""Plain-PyTorch Hedgehog feature map: the oracle for feature_map/hedgehog.py."""
from __future__ import annotations

import torch


def hedgehog_feature_map_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (B,H,T,D), weight (H,D,P), bias (H,P) or None -> [softmax(z), softmax(-z)] (B,H,T,2P), z = xW + b.

    fp32 math (like effconv.modeling.attention_ops.FeatureMap); the result is cast to `out_dtype` (default x.dtype).
    """
    z = torch.einsum("bhtd,hdp->bhtp", x.float(), weight.float())
    if bias is not None:
        z = z + bias.float()[None, :, None, :]
    out = torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
    return out.to(out_dtype or x.dtype)
