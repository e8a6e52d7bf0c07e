"""scaled_dot_product_attention takes what torch's takes (issue 18, items 1, 2, 9, 10): torch's
broadcasting of batch and head dims, any number of batch dims, 2-D inputs, head size 0, torch's
CausalBias masks, Hugging Face's finfo.min masks, numpy scalars, and exceptions that code written
against torch catches. Each case runs on the kernels (interpreted here) and on the CPU path, and is
judged by the numerics rule against the float64 reference; shapes and gradients' shapes against torch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import attn_fast
from attn_fast import reference
from numerics import check_op, rand

BACKENDS = ("auto", "reference")  # auto: the kernels (interpreted without a GPU); reference: the CPU path


@pytest.fixture(params=BACKENDS)
def backend(request):
    attn_fast.set_backend(request.param)
    return request.param


def _grad_inputs(shapes, dtype, device):
    return [rand(*s, dtype=dtype, device=device).requires_grad_() for s in shapes]


def _check(fast_fn, ref_fn, inputs, dtype):
    """Output and every input gradient of ``fast_fn`` by the numerics rule against ``ref_fn`` in float64
    and in ``dtype`` (tests/numerics.check_op, positional inputs); returns the fast output."""
    names = [f"input{i}" for i in range(len(inputs))]

    def by_name(fn):
        return lambda **args: fn(*(args[n] for n in names))

    check_op(by_name(fast_fn), by_name(ref_fn), {n: t.detach() for n, t in zip(names, inputs)}, grad=names,
             dtype=dtype)
    return fast_fn(*(t.detach() for t in inputs))


BROADCASTS = [
    # (query, key, value) shapes, kwargs
    ((2, 4, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), {}),                 # size-1 kv heads broadcast
    ((1, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), {}),                 # size-1 query batch
    ((2, 4, 5, 8), (1, 4, 6, 8), (2, 4, 6, 8), {}),                 # key and value batches differ
    ((2, 1, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8), {}),                 # size-1 query heads
    ((2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), dict(enable_gqa=True)),
    ((2, 3, 2, 5, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 8), {}),        # two batch dims
    ((2, 3, 2, 5, 8), (1, 3, 1, 6, 8), (1, 3, 1, 6, 8), {}),
    ((2, 3, 4, 5, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 8), dict(enable_gqa=True, is_causal=True)),
    ((5, 8), (6, 8), (6, 8), {}),                                   # 2-D (L, E)
    ((5, 8), (6, 8), (6, 8), dict(is_causal=True)),
    ((5, 8), (2, 6, 8), (2, 6, 8), {}),                             # mixed ranks
    ((2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8), {}),
]


@pytest.mark.parametrize("shapes", BROADCASTS, ids=lambda c: "-".join("x".join(map(str, s)) for s in c[:3]) + "".join(
    f"-{k}" for k in c[3]))
def test_broadcast_like_torch(shapes, backend):
    *qkv, kw = shapes
    inputs = _grad_inputs(qkv, torch.float32, "cpu")
    out = _check(lambda q, k, v: attn_fast.scaled_dot_product_attention(q, k, v, **kw),
                 lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, **kw), inputs, torch.float32)
    with torch.no_grad():
        assert out.shape == F.scaled_dot_product_attention(*inputs, **kw).shape


@pytest.mark.parametrize("mask_shape", [(3, 1, 5, 6), (2, 3, 1, 5, 6), (5, 6)])
def test_mask_with_two_batch_dims(mask_shape, backend):
    q, k, v = _grad_inputs([(2, 3, 2, 5, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 8)], torch.float32, "cpu")
    mask = rand(*mask_shape).requires_grad_()
    _check(lambda q, k, v, m: attn_fast.scaled_dot_product_attention(q, k, v, attn_mask=m),
           lambda q, k, v, m: reference.scaled_dot_product_attention(q, k, v, attn_mask=m), [q, k, v, mask],
           torch.float32)
    bool_mask = torch.rand(mask_shape) > 0.3
    _check(lambda q, k, v: attn_fast.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
           lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask), [q, k, v],
           torch.float32)


@pytest.mark.parametrize("kw", [{}, dict(is_causal=True), dict(attn_mask="float")], ids=["plain", "causal", "mask"])
def test_head_size_zero(kw, backend):
    """E = 0: every score is 0, so a row is the softmax of its mask alone (torch's result); the
    gradients of q and k are empty. Ev = 0: an empty output."""
    if kw.get("attn_mask") == "float":
        kw = dict(attn_mask=rand(5, 6))
    q, k, v = _grad_inputs([(1, 2, 5, 0), (1, 2, 6, 0), (1, 2, 6, 3)], torch.float32, "cpu")
    out = attn_fast.scaled_dot_product_attention(q, k, v, **kw)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              **{n: (t.double() if torch.is_tensor(t) else t) for n, t in kw.items()})
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-5)
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert gq.shape == q.shape and gk.shape == k.shape
    torch.testing.assert_close(gv, torch.autograd.grad(expected.sum(), v)[0], atol=1e-6, rtol=1e-5)
    ev0 = attn_fast.scaled_dot_product_attention(q.detach(), k.detach(), rand(1, 2, 6, 0))
    assert ev0.shape == (1, 2, 5, 0)
    q8, k8, v0 = _grad_inputs([(1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 0)], torch.float32, "cpu")
    out = attn_fast.scaled_dot_product_attention(q8, k8, v0)
    assert out.shape == (1, 2, 5, 0)
    grads = torch.autograd.grad(out.sum(), (q8, k8, v0))
    assert [g.shape for g in grads] == [q8.shape, k8.shape, v0.shape]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_head_size_zero_value_gradient(backend):
    """With E = 0 the weights are uniform over the visible keys, so dv[j] = sum of dO over the rows
    that see key j divided by how many keys each row sees."""
    q, k, v = _grad_inputs([(1, 1, 4, 0), (1, 1, 4, 0), (1, 1, 4, 3)], torch.float32, "cpu")
    out = attn_fast.scaled_dot_product_attention(q, k, v, is_causal=True)
    gv, = torch.autograd.grad(out.sum(), v)
    seen = torch.tensor([1 + 1 / 2 + 1 / 3 + 1 / 4, 1 / 2 + 1 / 3 + 1 / 4, 1 / 3 + 1 / 4, 1 / 4])
    torch.testing.assert_close(gv[0, 0], seen[:, None].expand(4, 3))


# ---------------------------------------------------------------- item 1: torch's CausalBias masks

@pytest.mark.parametrize("lq,lk", [(4, 6), (6, 6), (8, 6)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias(variant, lq, lk, backend):
    """A CausalBias is a causal flag with its alignment, never a tensor whose storage is read."""
    bias = (causal_upper_left if variant == "upper_left" else causal_lower_right)(lq, lk)
    alignment = "top_left" if variant == "upper_left" else "lower_right"
    inputs = _grad_inputs([(1, 2, lq, 8), (1, 2, lk, 8), (1, 2, lk, 8)], torch.float32, "cpu")
    out = _check(lambda q, k, v: attn_fast.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                 lambda q, k, v: reference.scaled_dot_product_attention(
                     q, k, v, is_causal=True, causal_alignment=alignment), inputs, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(out, F.scaled_dot_product_attention(*inputs, attn_mask=bias), atol=1e-5, rtol=1e-4)
        unmasked = attn_fast.scaled_dot_product_attention(*inputs)
    assert not torch.allclose(out, unmasked)


def test_causal_bias_16bit(backend):
    bias = causal_lower_right(5, 7)
    inputs = _grad_inputs([(2, 2, 5, 16), (2, 2, 7, 16), (2, 2, 7, 16)], torch.bfloat16, "cpu")
    _check(lambda q, k, v: attn_fast.scaled_dot_product_attention(q, k, v, attn_mask=bias),
           lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                  causal_alignment="lower_right"),
           inputs, torch.bfloat16)


def test_causal_bias_errors():
    q, k, v = rand(1, 2, 4, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    with pytest.raises(ValueError, match="do not set is_causal=True too"):
        attn_fast.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(4, 6), is_causal=True)
    with pytest.raises(ValueError, match=r"CausalBias attn_mask is for \(Lq, Lk\) = \(3, 6\), but query and key "
                                         r"have \(4, 6\)"):
        attn_fast.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(3, 6))
    with pytest.raises(ValueError, match="brings its own alignment"):
        attn_fast.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(4, 6),
                                               causal_alignment="lower_right")


# ---------------------------------------------------------------- item 10: exception types, numpy scalars

@pytest.mark.parametrize("call", [
    lambda: attn_fast.scaled_dot_product_attention(rand(1, 2, 4, 8), rand(1, 2, 6, 8).double(), rand(1, 2, 6, 8)),
    lambda: attn_fast.scaled_dot_product_attention(rand(8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)),
    lambda: attn_fast.scaled_dot_product_attention(rand(1, 4, 4, 8), rand(1, 3, 6, 8), rand(1, 3, 6, 8)),
    lambda: attn_fast.scaled_dot_product_attention(rand(1, 2, 4, 8), rand(1, 2, 6, 8), rand(1, 2, 5, 8)),
    lambda: attn_fast.squeeze_excite(rand(2, 8, 3, 3), rand(2, 7)),
    lambda: attn_fast.cbam(rand(2, 8, 3, 3), rand(2, 8), rand(8, 2), rand(1, 2, 4, 4)),
], ids=["mixed-dtypes", "rank-1", "heads", "value-length", "se-fc1", "cbam-conv"])
def test_errors_are_what_torch_raises_too(call):
    """torch raises RuntimeError for these; ours are also ValueError/TypeError with a clear message."""
    with pytest.raises(RuntimeError) as info:
        call()
    assert isinstance(info.value, (ValueError, TypeError))
    assert isinstance(info.value, (attn_fast.InputError, attn_fast.InputTypeError))


def test_numpy_scalars():
    q, k, v = rand(1, 2, 4, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    for scale in (np.float32(0.3), np.float64(0.3), torch.tensor(0.3)):
        out = attn_fast.scaled_dot_product_attention(q, k, v, scale=scale)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-4)
    torch.manual_seed(1)
    out = attn_fast.scaled_dot_product_attention(q, k, v, dropout_p=np.float64(0.25))
    assert out.shape == q.shape and torch.isfinite(out).all()
    # torch refuses numpy's bool for its bool flags; so do we, naming the type as it is
    with pytest.raises(TypeError, match=r"is_causal must be a bool, got numpy\.bool"):
        attn_fast.scaled_dot_product_attention(q, k, v, is_causal=np.bool_(True))
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, k, v, is_causal=np.bool_(True))


# ---------------------------------------------------------------- item 2: finfo.min masks

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_finfo_min_mask(dtype, causal, backend):
    """Hugging Face masks with torch.finfo(dtype).min: a key hidden by it gets no weight, and a row
    hidden only by it averages its keys as in torch (not a dead row of zeros, which only -inf makes);
    the gradients too (the backward's log-sum-exp keeps what its rounding loses at -3.4e38)."""
    lq, lk = 6, 9
    low = torch.finfo(dtype).min
    mask = rand(2, 1, lq, lk, dtype=dtype)
    mask[0, 0, 1, :] = low                      # a whole row
    mask[0, 0, 2, :4] = low                     # part of a row
    mask[1, 0, 3, :] = float("-inf")            # a dead row
    mask[1, 0, 4, :5] = low
    mask[1, 0, 4, 5:] = -2.0e38 if dtype != torch.float16 else -6.0e4  # below log2(e)'s overflow point
    mask[1, 0, 5, ::2] = float("-inf")
    mask[1, 0, 5, 1::2] = low
    mask.requires_grad_()
    inputs = _grad_inputs([(2, 2, lq, 16), (2, 2, lk, 16), (2, 2, lk, 16)], dtype, "cpu") + [mask]
    out = _check(lambda q, k, v, m: attn_fast.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal),
                 lambda q, k, v, m: reference.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal),
                 inputs, dtype)
    assert torch.equal(out[1, :, 3], torch.zeros_like(out[1, :, 3]))     # -inf: a dead row
    if dtype == torch.float32:  # the scores vanish next to -3.4e38: the row is the mean of its keys
        v = inputs[2].detach()
        visible = 2 if causal else lk
        torch.testing.assert_close(out[0, :, 1], v[0, :, :visible].mean(1), atol=1e-6, rtol=1e-5)
