"""reference.scaled_dot_product_attention against torch's own SDPA (float64, tight tolerance)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from attn_fast import reference
from numerics import rand

TOL = dict(rtol=1e-10, atol=1e-10)


def qkv(b=2, hq=3, hk=None, lq=5, lk=7, e=8, ev=None, dtype=torch.float64, grad=True):
    hk = hk or hq
    ev = ev or e
    q, k, v = rand(b, hq, lq, e, dtype=dtype), rand(b, hk, lk, e, dtype=dtype), rand(b, hk, lk, ev, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def both(ref_kwargs, torch_kwargs=None, **shape):
    """Run the reference and torch on the same inputs; compare outputs and input gradients."""
    q, k, v = qkv(**shape)
    torch_kwargs = ref_kwargs if torch_kwargs is None else torch_kwargs
    ours = reference.scaled_dot_product_attention(q, k, v, **ref_kwargs)
    theirs = F.scaled_dot_product_attention(q, k, v, **torch_kwargs)
    torch.testing.assert_close(ours, theirs, **TOL)
    g = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, (q, k, v), g)
    g_theirs = torch.autograd.grad(theirs, (q, k, v), g)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, **TOL)
    return ours


@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 7), (7, 5), (13, 13), (1, 17)])
def test_plain_and_causal_top_left(lq, lk):
    both({}, lq=lq, lk=lk)
    both({"is_causal": True}, lq=lq, lk=lk)


def test_scale_and_value_head_size():
    both({"scale": 0.37}, e=8, ev=5)
    both({"scale": 2.0}, e=3, ev=11)


@pytest.mark.parametrize("mask_shape", [(5, 7), (1, 7), (2, 1, 5, 7), (3, 5, 7), (2, 3, 5, 7), (1, 1, 7)])
def test_bool_mask_broadcasts(mask_shape):
    mask = torch.rand(mask_shape) > 0.3
    mask[..., 0] = True  # torch's (pre-2.5 semantics in some backends) would NaN on dead rows
    both({"attn_mask": mask})


@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 1, 7), (2, 3, 5, 7)])
def test_float_mask_broadcasts(mask_shape):
    both({"attn_mask": rand(*mask_shape, dtype=torch.float64)})


def test_float_mask_gradient():
    q, k, v = qkv()
    mask = rand(1, 3, 5, 7, dtype=torch.float64).requires_grad_(True)
    ours = reference.scaled_dot_product_attention(q, k, v, mask)
    theirs = F.scaled_dot_product_attention(q, k, v, mask)
    g = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, mask, g)[0], torch.autograd.grad(theirs, mask, g)[0], **TOL)


@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 1), (4, 4)])
def test_gqa(hq, hk):
    both({"enable_gqa": True}, hq=hq, hk=hk)


@pytest.mark.parametrize("lq,lk", [(3, 9), (9, 9), (1, 6)])
def test_causal_lower_right(lq, lk):
    ours = both({"is_causal": True, "causal_alignment": "lower_right"},
                {"attn_mask": causal_lower_right(lq, lk)}, lq=lq, lk=lk)
    assert ours.shape[-2] == lq


def test_fully_masked_rows_zero_output_and_grads():
    q, k, v = qkv()
    mask = torch.rand(2, 3, 5, 7) > 0.5
    mask[0, 1, 2] = False  # a dead row
    mask[1, :, 4] = False
    out = reference.scaled_dot_product_attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert (out[0, 1, 2] == 0).all() and (out[1, :, 4] == 0).all()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0, 1, 2] == 0).all() and (q.grad[1, :, 4] == 0).all()
    # torch (>= 2.5) agrees on the live rows and on the zeros
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), mask)
    torch.testing.assert_close(out.detach(), torch.nan_to_num(ref), **TOL)


def test_float_mask_minus_inf_rows():
    q, k, v = qkv()
    mask = rand(5, 7, dtype=torch.float64)
    mask[3] = float("-inf")
    out = reference.scaled_dot_product_attention(q, k, v, mask)
    assert (out[:, :, 3] == 0).all() and torch.isfinite(out).all()


def test_is_causal_with_mask_combines():
    q, k, v = qkv(lq=6, lk=6)
    mask = torch.rand(6, 6) > 0.3
    combined = mask & reference.causal_mask(6, 6)
    out = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=True)
    torch.testing.assert_close(out, reference.scaled_dot_product_attention(q, k, v, combined), **TOL)


def test_lse():
    q, k, v = qkv()
    mask = torch.rand(5, 7) > 0.4
    mask[2] = False
    out, lse = reference.scaled_dot_product_attention(q, k, v, mask, scale=0.5, return_lse=True)
    scores = (q @ k.transpose(-2, -1) * 0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), **TOL)
    assert torch.isneginf(lse[:, :, 2]).all()
    assert lse.shape == (2, 3, 5)


def test_dropout_with_mask_and_generator():
    q, k, v = qkv(grad=False)
    p = 0.3
    keep = torch.rand(2, 3, 5, 7) >= p
    out = reference.scaled_dot_product_attention(q, k, v, dropout_p=p, dropout_mask=keep)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1)
    torch.testing.assert_close(out, (probs * keep / (1 - p)) @ v, **TOL)
    # a generator makes the draw reproducible, and the kept share is about 1 - p
    gen = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    a = reference.scaled_dot_product_attention(q, k, v, dropout_p=p, generator=gen())
    b = reference.scaled_dot_product_attention(q, k, v, dropout_p=p, generator=gen())
    assert torch.equal(a, b) and not torch.allclose(a, reference.scaled_dot_product_attention(q, k, v))
    big = torch.ones(64, 64, 64, dtype=torch.float64)
    kept = reference.scaled_dot_product_attention(big[None], big[None], torch.eye(64, dtype=torch.float64)[None],
                                                  dropout_p=p, generator=gen()) > 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.02
    with pytest.raises(ValueError, match="dropout_mask"):
        reference.scaled_dot_product_attention(q, k, v, dropout_mask=keep)


def test_empty_lengths_match_torch():
    for lq, lk in [(0, 4), (4, 0)]:
        q, k, v = qkv(lq=lq, lk=lk, grad=False)
        ours = reference.scaled_dot_product_attention(q, k, v)
        assert ours.shape == (2, 3, lq, 8)
        torch.testing.assert_close(ours, torch.nan_to_num(F.scaled_dot_product_attention(q, k, v)), **TOL)


def test_low_precision_runs_and_is_close():
    q, k, v = qkv(grad=False)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        out = reference.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), is_causal=True)
        assert out.dtype == dt
        torch.testing.assert_close(out.double(), reference.scaled_dot_product_attention(q, k, v, is_causal=True),
                                   rtol=0, atol=3e-2)


def test_gradcheck_float64():
    q, k, v = qkv(b=1, hq=2, lq=3, lk=4, e=3)
    mask = rand(3, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda *a: reference.scaled_dot_product_attention(*a, is_causal=True, causal_alignment="lower_right"),
        (q, k, v, mask))
