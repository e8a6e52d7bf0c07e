"""Reference multi-head attention with the parameters of ``torch.nn.MultiheadAttention``.

Paper: Vaswani et al., "Attention Is All You Need", arXiv 1706.03762, section 3.2.2.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import causal_mask, safe_softmax, scaled_dot_product_attention

__all__ = ["multi_head_attention"]


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """torch.nn.MultiheadAttention's masks: bool True = may NOT attend; float = added to scores."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    *,
    q_proj_weight: Optional[Tensor] = None,
    k_proj_weight: Optional[Tensor] = None,
    v_proj_weight: Optional[Tensor] = None,
    bias_k: Optional[Tensor] = None,
    bias_v: Optional[Tensor] = None,
    add_zero_attn: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
    batch_first: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Shapes (``batch_first=False``, as torch): query (L, N, E), key (S, N, kdim), value (S, N, vdim);
    unbatched (L, E) inputs are accepted too. Returns (output (L, N, E), weights or None), weights
    (N, L, S) averaged over heads or (N, num_heads, L, S).

    Parameters follow ``nn.MultiheadAttention``: ``in_proj_weight`` (3E, E) packs W^Q, W^K, W^V when
    kdim == vdim == E; otherwise ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim),
    ``v_proj_weight`` (E, vdim). ``bias_k``/``bias_v`` (1, 1, E) append one key/value position;
    ``add_zero_attn`` appends a zero key/value position after the projections.
    Masks use torch's MultiheadAttention convention: bool True = NOT allowed to attend, float = added.
    ``key_padding_mask`` (N, S); ``attn_mask`` (L, S) or (N * num_heads, L, S).
    ``is_causal`` with no ``attn_mask`` applies a top-left causal mask (torch requires the mask too).
    Rows with every key masked give zeros (torch's need_weights=True path gives NaN there). The
    returned weights are those before dropout.
    """
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))

    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")

    if in_proj_weight is not None:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    b_q = b_k = b_v = None
    if in_proj_bias is not None:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q)
    k = F.linear(key, w_k, b_k)
    v = F.linear(value, w_v, b_v)

    mask = _additive(attn_mask, q.dtype)
    if mask is None and is_causal:
        mask = torch.zeros(tgt_len, k.size(0), dtype=q.dtype, device=q.device).masked_fill(
            ~causal_mask(tgt_len, k.size(0), device=q.device), float("-inf"))
    pad = _additive(key_padding_mask, q.dtype)

    def append_column(m: Optional[Tensor], col: float = 0.0) -> Optional[Tensor]:
        return None if m is None else F.pad(m, (0, 1), value=col)

    if bias_k is not None:
        k = torch.cat([k, bias_k.expand(1, bsz, -1)])
        v = torch.cat([v, bias_v.expand(1, bsz, -1)])
        mask, pad = append_column(mask), append_column(pad)

    # (len, N, E) -> (N, heads, len, head_dim)
    def heads(t: Tensor) -> Tensor:
        return t.reshape(t.size(0), bsz, num_heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = heads(q), heads(k), heads(v)
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
        v = torch.cat([v, v.new_zeros(bsz, num_heads, 1, head_dim)], dim=2)
        mask, pad = append_column(mask), append_column(pad)
    src_len = k.size(2)

    full = None
    if mask is not None:
        full = mask.view(bsz, num_heads, tgt_len, src_len) if mask.dim() == 3 else mask
    if pad is not None:
        pad = pad.view(bsz, 1, 1, src_len)
        full = pad if full is None else full + pad

    if dropout_p > 0.0 and dropout_mask is not None:
        dropout_mask = dropout_mask.view(bsz, num_heads, tgt_len, src_len)
    out = scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=dropout_p, dropout_mask=dropout_mask)
    out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)

    weights = None
    if need_weights:
        scores = (q / head_dim ** 0.5) @ k.transpose(-2, -1)
        if full is not None:
            scores = scores + full
        weights = safe_softmax(scores)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            weights = weights.squeeze(0)

    if unbatched:
        out = out.squeeze(1)
    elif batch_first:
        out = out.transpose(0, 1)
    return out, weights
