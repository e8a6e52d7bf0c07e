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
from . import attention_cpu

OP = "scaled_dot_product_attention"


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


@torch.library.custom_op("attn_fast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                  causal_offset: int, allow_tf32: bool, dropout_p: float,
                  seed: Optional[Tensor], deterministic: bool = False) -> Tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Ev), lse (B, Hq, Lq) fp32 in log2 units; (2, B, Hq, Lq) with its rounding
    residual for a float mask, see kernels.attention_fwd) from the Triton forward. ``seed`` is a
    one-element int64 tensor (the Philox seed of dropout), None without dropout. ``deterministic``
    (also for the backward of this call) fixes the tile configs and avoids atomics."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.attention_fwd import attention_fwd as launch

        return launch(q, k, v, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, _seed(seed),
                      deterministic or torch.are_deterministic_algorithms_enabled())


@attention_fwd.register_fake
def _(q, k, v, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, seed, deterministic=False):
    b, h, lq, _ = q.shape
    # lse with its rounding residual for a float mask: (2, B, Hq, Lq) (kernels.attention_fwd)
    lse = (2, b, h, lq) if mask is not None and mask.is_floating_point() else (b, h, lq)
    return q.new_empty((b, h, lq, v.shape[-1])), q.new_empty(lse, dtype=torch.float32)


@torch.library.custom_op("attn_fast::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                  scale: float, is_causal: bool, causal_offset: int, allow_tf32: bool, dropout_p: float,
                  seed: Optional[Tensor], mask_grad: bool,
                  deterministic: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask) from the Triton backward; dmask has the float mask's shape when
    ``mask_grad``, else it is an empty placeholder (ops cannot return None). ``deterministic``, or
    ``torch.use_deterministic_algorithms(True)`` when the backward runs, gives the same bits every run."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.attention_bwd import attention_bwd as launch

        dq, dk, dv, dmask = launch(do, q, k, v, out, lse, mask, scale, is_causal, causal_offset, allow_tf32,
                                   dropout_p, _seed(seed), mask_grad,
                                   deterministic or torch.are_deterministic_algorithms_enabled())
        return dq, dk, dv, q.new_empty(0) if dmask is None else dmask


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, seed, mask_grad,
      deterministic=False):
    # as the launcher: dq, dk, dv contiguous whatever the layout of q, k, v (not empty_like, which
    # keeps a transposed view's strides); dmask only for a float mask, contiguous, in its dtype
    mask_grad = mask_grad and mask is not None and mask.is_floating_point()
    dmask = q.new_empty(mask.shape, dtype=mask.dtype) if mask_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.args = (scale, is_causal, causal_offset, allow_tf32, dropout_p)
    ctx.deterministic = deterministic


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    mask_grad = bool(ctx.needs_input_grad[3])
    dq, dk, dv, dmask = attention_bwd(dout, q, k, v, out, lse, mask, *ctx.args, seed, mask_grad, ctx.deterministic)
    return dq, dk, dv, dmask if mask_grad else None, None, None, None, None, None, None, None


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
    from ..kernels.interpreter import kernel_section

    with kernel_section():
        return launch(_seed(seed), *shape, dropout_p, device)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                                 dropout_p: float, is_causal: bool, scale: Optional[float],
                                 enable_gqa: bool, causal_alignment: str, deterministic: bool = False) -> Tensor:
    path = route(OP, query.device, query.dtype, tensors=(query, key, value, attn_mask))
    if path.path == "cpu":
        return attention_cpu.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                          enable_gqa, causal_alignment)
    if path.path == "reference":
        return reference.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
            causal_alignment=causal_alignment)
    unbatched = query.dim() == 3
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    e, lq, lk = query.shape[-1], query.shape[-2], key.shape[-2]
    mask = None
    if attn_mask is not None:  # 4-D view; the kernels broadcast it through strides (no copy), and its
        mask = attn_mask[(None,) * (4 - attn_mask.dim())]  # gradient comes back in its own shape
    scale = e ** -0.5 if scale is None else scale
    causal_offset = 0 if causal_alignment == "top_left" else lk - lq
    allow_tf32 = query.dtype == torch.float32 and query.is_cuda and torch.backends.cuda.matmul.allow_tf32
    seed = draw_dropout_seed() if dropout_p > 0.0 else None
    out, _ = attention_fwd(query, key, value, mask, scale, is_causal, causal_offset, allow_tf32, dropout_p, seed,
                           deterministic)
    return out.squeeze(0) if unbatched else out
