"""The CPU path of scaled_dot_product_attention (issue 19, first step): torch's fused CPU kernels where
they compute what ours defines, blocks of queries through them where ours extend torch's (a mask
together with is_causal, lower-right causal alignment with Lq != Lk). ``set_backend("cpu")`` selects
it here, where the interpreter would otherwise run the kernels. Judged by the numerics rule against
the float64 reference (the edge-case table and the fuzz profile run it too: tests/test_edge_cases.py,
tests/test_fuzz.py); memory by what is alive at once (bench.measure.PeakLive, the bench's CPU column).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import attn_fast
from attn_fast import dispatch, reference
from attn_fast.ops import attention_cpu
from bench.measure import PeakLive
from numerics import assert_close, check_op, rand

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def cpu_path():
    attn_fast.set_backend("cpu")
    r = dispatch.route("scaled_dot_product_attention", torch.device("cpu"), torch.float32, warn=False)
    assert r.path == "cpu", r.reason


def _judge(dtype, inputs, **kw):
    """Output and every gradient on the CPU path against the reference in float64 and in ``dtype``
    (tests/numerics.check_op)."""
    inputs = {n: t.to(dtype) if t is not None and t.is_floating_point() else t for n, t in inputs.items()}
    names = [n for n, t in inputs.items() if t is not None and t.is_floating_point()]
    check_op(lambda **a: attn_fast.scaled_dot_product_attention(**a, **kw),
             lambda **a: reference.scaled_dot_product_attention(**a, **kw), inputs, grad=names, dtype=dtype)


EXTENSIONS = list(itertools.product([(40, 40), (40, 27), (27, 40), (70, 30)], ["top_left", "lower_right"],
                                    [None, "bool", "float", "padding"]))


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("lengths,alignment,mask", EXTENSIONS, ids=lambda v: str(v))
def test_causal_extensions_in_query_blocks(lengths, alignment, mask, dtype, monkeypatch):
    """is_causal with a mask, and lower-right alignment, run in query blocks (16 rows here, so the
    blocks, the keys left out past each block's diagonal and the dead blocks of Lq > Lk all occur)."""
    monkeypatch.setattr(attention_cpu, "QUERY_BLOCK", 16)
    lq, lk = lengths
    inputs = dict(query=rand(2, 4, lq, 16), key=rand(2, 2, lk, 16), value=rand(2, 2, lk, 8), attn_mask=None)
    if mask == "bool":
        inputs["attn_mask"] = torch.rand(2, 4, lq, lk) > 0.3
    elif mask == "float":
        inputs["attn_mask"] = rand(2, 1, lq, lk)
    elif mask == "padding":
        inputs["attn_mask"] = rand(2, 1, 1, lk)
    _judge(dtype, inputs, is_causal=True, causal_alignment=alignment, enable_gqa=True)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("kw", [{}, dict(is_causal=True), dict(attn_mask="float"), dict(attn_mask="bool")],
                         ids=["plain", "causal", "float-mask", "bool-mask"])
def test_torch_kernels_where_they_agree(kw, dtype):
    kw = dict(kw)
    inputs = dict(query=rand(2, 3, 33, 24), key=rand(2, 3, 29, 24), value=rand(2, 3, 29, 12))
    if kw.get("attn_mask") == "float":
        inputs["attn_mask"] = rand(1, 3, 33, 29)
        del kw["attn_mask"]
    elif kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(2, 1, 33, 29) > 0.5
    _judge(dtype, inputs, **kw)


def test_fp16_scores_beyond_its_range_stay_finite():
    """Scores of 256 * 256 * 80 / sqrt(80) overflow fp16: the reference in fp16 gives NaN, torch and
    the CPU path (fp32 inside) give the finite answer."""
    x = torch.full((1, 1, 4, 80), 256.0, dtype=F16)
    out = attn_fast.scaled_dot_product_attention(x, x, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(x, x, x))
    assert not torch.isfinite(reference.scaled_dot_product_attention(x, x, x)).all()


def test_dropout_is_torch_generator_reproducible():
    q, k, v = rand(1, 2, 20, 8), rand(1, 2, 20, 8), rand(1, 2, 20, 8)
    torch.manual_seed(3)
    a = attn_fast.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = attn_fast.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, attn_fast.scaled_dot_product_attention(q, k, v))
    # unbiased: the mean over draws approaches the output without dropout
    mean = torch.stack([attn_fast.scaled_dot_product_attention(q, k, v, dropout_p=0.3) for _ in range(400)]).mean(0)
    torch.testing.assert_close(mean, attn_fast.scaled_dot_product_attention(q, k, v), atol=0.12, rtol=0)


@pytest.mark.parametrize("case", ["causal", "padding-mask", "mask-grad", "mask-and-causal", "lower-right"])
def test_memory_is_linear_in_length(case, monkeypatch):
    """Forward and backward: what is alive at once grows linearly in L and stays far below one
    Lq x Lk score matrix, for torch's kernels (causal, a padding mask) and for the blocked cases (a
    mask's gradient, a mask with is_causal, lower-right alignment). A mask's gradient takes the
    blocks only beyond DIRECT_SCORE_BYTES of scores, set to 0 here."""
    monkeypatch.setattr(attention_cpu, "DIRECT_SCORE_BYTES", 0)
    def peak(length):
        lq, lk = length, length + (length // 4 if case == "lower-right" else 0)
        q, k, v = (rand(1, 2, n, 16).requires_grad_() for n in (lq, lk, lk))
        mask = rand(1, 1, 1, lk).requires_grad_(case == "mask-grad") if "mask" in case else None
        kw = dict(is_causal=case in ("causal", "mask-and-causal", "lower-right"),
                  causal_alignment="lower_right" if case == "lower-right" else "top_left")
        g = rand(1, 2, lq, 16)
        with PeakLive() as rec:
            attn_fast.scaled_dot_product_attention(q, k, v, mask, **kw).backward(g)
        return rec.peak, 2 * lq * lk * 4

    (small, scores_small), (big, scores_big) = peak(1024), peak(2048)
    assert big < scores_big / 2, f"{big} B alive at once, one fp32 score matrix is {scores_big} B"
    assert big <= 2.5 * small, (small, big)


def test_forward_mode_ad_takes_the_reference():
    """torch's fused CPU kernels have no forward-mode AD: such calls take the reference, exactly."""
    q, k, v = rand(1, 2, 6, 8), rand(1, 2, 7, 8), rand(1, 2, 7, 8)
    t = rand(1, 2, 6, 8)
    out, tangent = torch.func.jvp(lambda q: attn_fast.scaled_dot_product_attention(q, k, v, is_causal=True), (q,), (t,))
    out64, tangent64 = torch.func.jvp(
        lambda q: reference.scaled_dot_product_attention(q, k.double(), v.double(), is_causal=True), (q.double(),),
        (t.double(),))
    _, tangent_lp = torch.func.jvp(lambda q: reference.scaled_dot_product_attention(q, k, v, is_causal=True), (q,), (t,))
    assert_close(tangent, tangent64, tangent_lp, "tangent")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("mask_shape", [(2, 3, 40, 29), (1, 1, 1, 29), (3, 40, 1)])
def test_mask_gradient_in_query_blocks(mask_shape, dtype, monkeypatch):
    """A float mask's gradient beyond DIRECT_SCORE_BYTES (0 here): checkpointed query blocks of 16 rows,
    the mask's gradient summed over its broadcast dims by autograd."""
    monkeypatch.setattr(attention_cpu, "DIRECT_SCORE_BYTES", 0)
    monkeypatch.setattr(attention_cpu, "QUERY_BLOCK", 16)
    inputs = dict(query=rand(2, 3, 40, 16), key=rand(2, 3, 29, 16), value=rand(2, 3, 29, 8),
                  attn_mask=rand(*mask_shape))
    _judge(dtype, inputs)
