"""Reference encoder-decoder attention of RNN sequence-to-sequence models (the seed article's first
attention): the decoder state scores every encoder state, and the context vector is the
softmax-weighted sum of the encoder states.

Papers: Bahdanau, Cho, Bengio, "Neural Machine Translation by Jointly Learning to Align and
Translate", arXiv 1409.0473 (additive score); Luong, Pham, Manning, "Effective Approaches to
Attention-based Neural Machine Translation", arXiv 1508.04025 (dot and general scores).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .attention import safe_softmax

__all__ = ["additive_attention", "luong_attention", "LUONG_SCORES"]

LUONG_SCORES = ("dot", "general")


def _context(scores: Tensor, values: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = safe_softmax(scores)
    return (weights.unsqueeze(-2) @ values).squeeze(-2), weights


def additive_attention(
    query: Tensor,
    keys: Tensor,
    query_weight: Tensor,
    key_weight: Tensor,
    v: Tensor,
    values: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Bahdanau attention: e_j = v^T tanh(W_q q + W_k k_j), a = softmax(e), c = sum_j a_j v_j.

    Shapes: query (N, Dq) (the decoder state), keys (N, L, Dk) (encoder states), query_weight
    (A, Dq), key_weight (A, Dk), v (A,), values (N, L, Dv) defaulting to keys, mask (N, L) bool with
    True = may attend. Returns (context (N, Dv), weights (N, L)).
    """
    hidden = torch.tanh((query @ query_weight.T).unsqueeze(1) + keys @ key_weight.T)  # (N, L, A)
    return _context(hidden @ v, keys if values is None else values, mask)


def luong_attention(
    query: Tensor,
    keys: Tensor,
    values: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    score: str = "dot",
) -> Tuple[Tensor, Tensor]:
    r"""Luong attention: e_j = q^T k_j ("dot") or q^T W k_j ("general"), a = softmax(e),
    c = sum_j a_j v_j.

    Shapes: query (N, D), keys (N, L, D) (or (N, L, Dk) with ``weight`` (D, Dk) for "general"),
    values (N, L, Dv) defaulting to keys, mask (N, L) bool with True = may attend.
    Returns (context (N, Dv), weights (N, L)).
    """
    if score == "dot":
        projected = query
    elif score == "general":
        if weight is None:
            raise ValueError('luong_attention(score="general") needs weight (D, Dk)')
        projected = query @ weight
    else:
        raise ValueError(f"score must be one of {LUONG_SCORES}, got {score!r}")
    scores = (keys @ projected.unsqueeze(-1)).squeeze(-1)
    return _context(scores, keys if values is None else values, mask)
