"""The CPU path of scaled_dot_product_attention: torch's own fused CPU kernels
(``torch.nn.functional.scaled_dot_product_attention``, which on the CPU runs a flash-attention
kernel: fp32 accumulation, O(L) memory, torch's autograd) wherever they compute what ours defines,
and blocks of queries through the same kernels where they don't.

fp16 runs in fp32 (torch's fp16 CPU kernel loses the NaN rows of +inf scores; fp32 is also faster on
a CPU), bf16 and fp32 as they are. What torch's kernels take as they are: no mask or a bool/float mask, top-left causal masking,
GQA, dropout, scale. Fully-masked rows give zeros there too (torch >= 2.5), as ours define.
Our extensions, which torch refuses or aligns otherwise: a mask together with ``is_causal``, and
lower-right causal alignment with Lq != Lk; and a float mask that needs its gradient, for which torch
falls back to its math backend (Lq x Lk scores; beyond DIRECT_SCORE_BYTES of them). For those, the queries run in blocks of QUERY_BLOCK rows,
each with its causal band merged into its slice of the mask (a QUERY_BLOCK x Lk tile, never
Lq x Lk), and with the keys past the block's last diagonal left out. Under autograd each block is
checkpointed (torch.utils.checkpoint: recomputed in the backward, dropout's RNG state kept), so the
backward holds one block's tiles at a time too: memory O(QUERY_BLOCK x Lk), not O(Lq x Lk). Empty inputs (B, H, Lq, Lk or
a head size of 0) take the reference, which gives every input a zero gradient of its shape.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import reference

#: Query rows per block where the causal band has to be built (the extension cases).
QUERY_BLOCK = 256
#: A float mask's gradient takes torch's kernels directly (its math backend materialises the fp32
#: scores: faster, by not recomputing) while those scores, B * Hq * Lq * Lk * 4 bytes, fit in this;
#: larger problems run in checkpointed query blocks.
DIRECT_SCORE_BYTES = 64 * 2 ** 20


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                                 dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
                                 causal_alignment: str) -> Tensor:
    """q (B, Hq, Lq, E), k (B, Hk, Lk, E), v (B, Hk, Lk, Ev) and a mask broadcastable to
    (B, Hq, Lq, Lk), checked by attn_fast.functional; the meaning of attn_fast.reference's."""
    lq, lk = query.shape[-2], key.shape[-2]
    if query.numel() == 0 or value.numel() == 0:  # nothing to compute: the defined empty or zero results
        return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa, causal_alignment=causal_alignment)
    if query.dtype == torch.float16:  # torch's fp16 CPU kernel drops +inf scores' NaN rows; fp32 is exact
        out = scaled_dot_product_attention(
            query.float(), key.float(), value.float(),
            attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask,
            dropout_p, is_causal, scale, enable_gqa, causal_alignment)
        return out.to(torch.float16)
    offset = 0 if causal_alignment == "top_left" else lk - lq
    gqa = enable_gqa and query.shape[-3] != key.shape[-3]
    # a float mask's gradient: torch's math backend, Lq x Lk fp32 scores (blocked beyond DIRECT_SCORE_BYTES)
    mask_grad = (attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
                 and math.prod(query.shape[:-1]) * lk * 4 > DIRECT_SCORE_BYTES)
    if not mask_grad and (not is_causal or (attn_mask is None and offset == 0)):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=gqa)
    track = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, attn_mask))
    if not is_causal:
        offset = lk  # every key visible to every row: the blocks without a causal band
    blocks = []
    for start in range(0, lq, QUERY_BLOCK):
        stop = min(lq, start + QUERY_BLOCK)
        keys = max(0, min(lk, stop + offset))  # no row of the block sees a key past its last diagonal
        q = query[..., start:stop, :]
        if keys == 0:  # every row of the block is past the keys (lower-right, Lq > Lk): dead rows,
            # which torch's kernels give (zeros, zero gradients) for no keys at all
            blocks.append(F.scaled_dot_product_attention(q, key[..., :0, :], value[..., :0, :], scale=scale,
                                                         enable_gqa=gqa))
            continue
        tile = None
        if attn_mask is not None:  # views: nothing is copied, nothing of the block is kept
            tile = attn_mask[..., start:stop, :keys] if attn_mask.shape[-2] != 1 else attn_mask[..., :keys]
        args = (q, key[..., :keys, :], value[..., :keys, :], tile, is_causal, start, offset, dropout_p, scale, gqa)
        if track:  # recomputed in the backward, as activation checkpointing does (dropout included)
            blocks.append(checkpoint(_query_block, *args, use_reentrant=False, preserve_rng_state=dropout_p > 0))
        else:
            blocks.append(_query_block(*args))
    return torch.cat(blocks, dim=-2)


def _query_block(q: Tensor, key: Tensor, value: Tensor, tile: Optional[Tensor], causal: bool, start: int,
                 offset: int, dropout_p: float, scale: Optional[float], gqa: bool) -> Tensor:
    """Query rows start.. of the blocked cases: the causal band of the block (if ``causal``) merged into
    its tile of the mask (rows x keys), through torch's kernel."""
    if not causal:
        return F.scaled_dot_product_attention(q, key, value, attn_mask=tile, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    rows = torch.arange(start, start + q.shape[-2], device=q.device)[:, None]
    band = torch.arange(key.shape[-2], device=q.device)[None, :] <= rows + offset     # (rows, keys) bool
    mask = band
    if tile is not None:
        mask = tile & band if tile.dtype == torch.bool else tile.masked_fill(~band, float("-inf"))
    return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=gqa)
