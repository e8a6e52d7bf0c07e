"""Bahdanau (additive) and Luong (dot / general) attention references against a per-element loop
written straight from the papers' formulas (float64)."""
import math

import pytest
import torch

from attn_fast import reference
from numerics import rand

TOL = dict(rtol=1e-10, atol=1e-10)


def loop_context(score, query, keys, values, mask):
    """c = sum_j softmax_j(score(q, k_j)) v_j, one batch element and one key at a time."""
    n, length = keys.shape[:2]
    contexts, weights = [], []
    for b in range(n):
        e = [score(query[b], keys[b, j]) if mask is None or mask[b, j] else -math.inf for j in range(length)]
        m = max(e)
        w = [0.0 if ej == -math.inf else math.exp(ej - m) for ej in e]
        total = sum(w)
        w = [wj / total for wj in w]
        weights.append(torch.tensor(w, dtype=torch.float64))
        contexts.append(sum(wj * values[b, j] for j, wj in enumerate(w)))
    return torch.stack(contexts), torch.stack(weights)


@pytest.mark.parametrize("masked", [False, True])
def test_additive_attention(masked):
    n, length, dq, dk, a = 3, 6, 5, 4, 7
    q, keys = rand(n, dq, dtype=torch.float64), rand(n, length, dk, dtype=torch.float64)
    wq, wk, v = rand(a, dq, dtype=torch.float64), rand(a, dk, dtype=torch.float64), rand(a, dtype=torch.float64)
    values = rand(n, length, 3, dtype=torch.float64)
    mask = (torch.rand(n, length) > 0.4) | (torch.arange(length) == 0) if masked else None

    def score(qb, kj):
        return float(v @ torch.tanh(wq @ qb + wk @ kj))

    ctx, w = reference.additive_attention(q, keys, wq, wk, v, values, mask)
    ctx_loop, w_loop = loop_context(score, q, keys, values, mask)
    torch.testing.assert_close(ctx, ctx_loop, **TOL)
    torch.testing.assert_close(w, w_loop, **TOL)


@pytest.mark.parametrize("score_name", ["dot", "general"])
def test_luong_attention(score_name):
    n, length, d, dk = 2, 5, 4, 6
    q = rand(n, d, dtype=torch.float64)
    keys = rand(n, length, d if score_name == "dot" else dk, dtype=torch.float64)
    weight = rand(d, dk, dtype=torch.float64) if score_name == "general" else None
    mask = torch.rand(n, length) > 0.3
    mask[:, 2] = True

    def score(qb, kj):
        return float(qb @ kj) if weight is None else float(qb @ weight @ kj)

    ctx, w = reference.luong_attention(q, keys, weight=weight, mask=mask, score=score_name)
    ctx_loop, w_loop = loop_context(score, q, keys, keys, mask)
    torch.testing.assert_close(ctx, ctx_loop, **TOL)
    torch.testing.assert_close(w, w_loop, **TOL)


def test_luong_bad_arguments():
    q, keys = rand(1, 3, dtype=torch.float64), rand(1, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="score must be one of"):
        reference.luong_attention(q, keys, score="concat")
    with pytest.raises(ValueError, match="needs weight"):
        reference.luong_attention(q, keys, score="general")


def test_gradients_flow_and_fully_masked_is_zero():
    n, length, d = 2, 4, 3
    q = rand(n, d, dtype=torch.float64).requires_grad_(True)
    keys = rand(n, length, d, dtype=torch.float64).requires_grad_(True)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[1] = False
    ctx, w = reference.luong_attention(q, keys, mask=mask)
    assert (ctx[1] == 0).all() and (w[1] == 0).all()
    ctx.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[1] == 0).all()
    assert torch.autograd.gradcheck(lambda a, b: reference.luong_attention(a, b)[0],
                                    (q.detach().requires_grad_(), keys.detach().requires_grad_()))
