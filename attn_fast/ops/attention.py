"""Scaled dot-product attention op: the registered differentiable Triton op and its dispatch.

``attn_fast::attention_fwd`` and ``attn_fast::attention_bwd`` are ``torch.library.custom_op``s (opaque
to the compiler, with fake implementations), the forward's autograd formula calls the backward op,
so ``torch.compile(fullgraph=True)`` runs functions that use them without graph breaks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..dispatch import route

OP = "scaled_dot_product_attention"


@torch.library.custom_op("attn_fast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                  causal_offset: int, allow_tf32: bool) -> Tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Ev), lse (B, Hq, Lq) fp32 in log2 units) from the Triton forward."""
    from ..kernels.attention_fwd import attention_fwd as launch

    return launch(q, k, v, mask, scale, is_causal, causal_offset, allow_tf32)


@attention_fwd.register_fake
def _(q, k, v, mask, scale, is_causal, causal_offset, allow_tf32):
    b, h, lq, _ = q.shape
    return q.new_empty((b, h, lq, v.shape[-1])), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("attn_fast::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                  scale: float, is_causal: bool, causal_offset: int,
                  allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the Triton backward."""
    from ..kernels.attention_bwd import attention_bwd as launch

    return launch(do, q, k, v, out, lse, mask, scale, is_causal, causal_offset, allow_tf32)


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, mask, scale, is_causal, causal_offset, allow_tf32):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, causal_offset, allow_tf32 = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.args = (scale, is_causal, causal_offset, allow_tf32)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _unsupported(attn_mask: Optional[Tensor], dropout_p: float) -> Optional[str]:
    """The configurations the kernels do not cover yet (they run the reference, with a warning)."""
    if dropout_p > 0.0:
        return "dropout_p > 0"
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        return "the gradient of a float attn_mask"
    return None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                                 dropout_p: float, is_causal: bool, scale: Optional[float],
                                 enable_gqa: bool, causal_alignment: str) -> Tensor:
    path = route(OP, query.device, query.dtype, _unsupported(attn_mask, dropout_p))
    if path.path == "reference":
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            causal_alignment=causal_alignment)
    unbatched = query.dim() == 3
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    b, h, lq, e = query.shape
    lk = key.shape[-2]
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(b, h, lq, lk)  # a view: stride 0 along broadcast dims, no copy
    scale = e ** -0.5 if scale is None else scale
    causal_offset = 0 if causal_alignment == "top_left" else lk - lq
    allow_tf32 = query.dtype == torch.float32 and query.is_cuda and torch.backends.cuda.matmul.allow_tf32
    out, _ = attention_fwd(query, key, value, mask, scale, is_causal, causal_offset, allow_tf32)
    return out.squeeze(0) if unbatched else out
