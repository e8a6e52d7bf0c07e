"""Reference scaled dot-product attention: the definition the kernels are tested against, and the
CPU path. Plain PyTorch, differentiable, any floating dtype (float64 included).

Paper: Vaswani et al., "Attention Is All You Need", arXiv 1706.03762, section 3.2.1.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["scaled_dot_product_attention", "causal_mask", "safe_softmax", "CAUSAL_ALIGNMENTS"]

#: How a causal mask lines up when Lq != Lk.
#: "top_left": query i sees keys j <= i (torch's ``is_causal``).
#: "lower_right": query i sees keys j <= i + (Lk - Lq) (FlashAttention, torch's ``causal_lower_right``):
#: the last query sees every key, as in decoding with a KV cache.
CAUSAL_ALIGNMENTS = ("top_left", "lower_right")


def causal_mask(lq: int, lk: int, alignment: str = "top_left", device=None) -> Tensor:
    """Bool (lq, lk) mask, True where query i may attend to key j."""
    if alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {alignment!r}")
    offset = 0 if alignment == "top_left" else lk - lq
    i = torch.arange(lq, device=device).unsqueeze(-1)
    j = torch.arange(lk, device=device)
    return j <= i + offset


def safe_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim; a row that is all -inf gives zeros (and zero gradients), not NaN."""
    # Give dead rows finite scores before the softmax, then zero them: a NaN from softmax would
    # otherwise leak into the gradient even if masked out afterwards.
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    causal_alignment: str = "top_left",
    dropout_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""softmax(Q K^T * scale + M) V, with the signature and semantics of
    ``torch.nn.functional.scaled_dot_product_attention``.

    .. math::
        S = \mathrm{scale}\cdot Q K^\top + M,\quad P = \mathrm{softmax}(S),\quad O = \mathrm{dropout}(P) V

    Shapes: query (..., Hq, Lq, E), key (..., Hk, Lk, E), value (..., Hk, Lk, Ev) -> (..., Hq, Lq, Ev).

    Args:
        attn_mask: bool (True = may attend) or additive float mask, broadcastable to (..., Hq, Lq, Lk).
            May be combined with ``is_causal`` (torch itself rejects the combination; here both apply).
        dropout_p: probability of dropping an attention weight; kept weights are scaled by 1/(1-p).
        is_causal: apply a causal mask aligned by ``causal_alignment`` (default top-left, as torch).
        scale: defaults to 1/sqrt(E).
        enable_gqa: key/value have Hk heads with Hq % Hk == 0; query head h uses kv head h // (Hq/Hk).
        causal_alignment: "top_left" or "lower_right" (see :data:`CAUSAL_ALIGNMENTS`).
        dropout_mask: bool keep-mask broadcastable to (..., Hq, Lq, Lk) used instead of drawing one
            (lets a test apply the exact mask a kernel drew). Requires ``dropout_p > 0``.
        generator: RNG for drawing the keep-mask when ``dropout_mask`` is None.
        return_lse: also return the natural log-sum-exp of each row of S, shape (..., Hq, Lq), computed
            before dropout (-inf for a fully-masked row).

    A query row whose keys are all masked out gets zero output and zero gradients (torch >= 2.5).
    """
    if enable_gqa and query.size(-3) != key.size(-3):
        groups = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    lq, lk = query.size(-2), key.size(-2)
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))

    scores = (query * scale) @ key.transpose(-2, -1)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(lq, lk, causal_alignment, scores.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)

    probs = safe_softmax(scores)

    if dropout_p > 0.0:
        if dropout_mask is None:
            draw = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float32)
            dropout_mask = draw >= dropout_p
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_mask is not None:
        raise ValueError("dropout_mask was given but dropout_p is 0")

    out = probs @ value
    if return_lse:
        return out, torch.logsumexp(scores, dim=-1)
    return out
