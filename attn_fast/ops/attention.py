"""Scaled dot-product attention op: dispatch to the Triton kernels or the reference."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import reference
from ..dispatch import route

OP = "scaled_dot_product_attention"


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                                 dropout_p: float, is_causal: bool, scale: Optional[float],
                                 enable_gqa: bool, causal_alignment: str) -> Tensor:
    path = route(OP, query.device, query.dtype)
    # The Triton kernels plug in here when path.path == "triton" (issue 3); until then every path
    # runs the reference.
    del path
    return reference.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        causal_alignment=causal_alignment)
