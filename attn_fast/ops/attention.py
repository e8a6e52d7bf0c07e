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


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


@torch.library.custom_op("attn_fast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                  causal_offset: int, allow_tf32: bool, dropout_p: float,
                  seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Ev), lse (B, Hq, Lq) fp32 in log2 units) from the Triton forward. ``seed`` is a
    one-element int64 tensor (the Philox seed of dropout), None without dropout."""
    from ..kernels.attention_fwd import attention_fwd as launch

    return launch(q, k, v, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, _seed(seed))


@attention_fwd.register_fake
def _(q, k, v, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, seed):
    b, h, lq, _ = q.shape
    return q.new_empty((b, h, lq, v.shape[-1])), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("attn_fast::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                  scale: float, is_causal: bool, causal_offset: int, allow_tf32: bool, dropout_p: float,
                  seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the Triton backward."""
    from ..kernels.attention_bwd import attention_bwd as launch

    return launch(do, q, k, v, out, lse, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, _seed(seed))


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.args = (scale, is_causal, causal_offset, allow_tf32, dropout_p)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, mask, *ctx.args, seed)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def draw_dropout_seed() -> Tensor:
    """The Philox seed of one dropout call: drawn from torch's default CPU generator, so
    ``torch.manual_seed`` makes dropout reproducible (and lets a test redraw the same seed)."""
    return torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64)


def dropout_keep_mask(seed: Tensor, shape: Tuple[int, int, int, int], dropout_p: float,
                      device: torch.device) -> Tensor:
    """The bool keep-mask (B, Hq, Lq, Lk) that the kernels applied for ``seed`` (a tensor from
    :func:`draw_dropout_seed`); needs CUDA or Triton's interpreter."""
    from ..kernels.attention_fwd import dropout_keep_mask as launch

    return launch(_seed(seed), *shape, dropout_p, device)


def _unsupported(attn_mask: Optional[Tensor], dropout_p: float) -> Optional[str]:
    """The configurations the kernels do not cover yet (they run the reference, with a warning)."""
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
    seed = draw_dropout_seed() if dropout_p > 0.0 else None
    out, _ = attention_fwd(query, key, value, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, seed)
    return out.squeeze(0) if unbatched else out
