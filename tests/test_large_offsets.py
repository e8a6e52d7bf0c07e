"""Index arithmetic past 2**31 elements (issue 8): when the attention kernels switch to 64-bit
offsets, and what SE/ECA/CBAM do with a sample of 2**31 elements or more (run the reference, with
a warning). The emulated-huge-stride runs of the kernels themselves are in tests/test_edge_cases.py."""
from __future__ import annotations

import warnings

import pytest
import torch

import attn_fast
from attn_fast import reference
from attn_fast.kernels.attention_fwd import needs_int64
from attn_fast.ops import squeeze_excite as se_ops
from numerics import check_op, rand


def strided(size, stride):
    """Shape and strides only (needs_int64 reads nothing else): a meta tensor."""
    return torch.empty_strided(size, stride, device="meta")


def test_needs_int64_reads_the_largest_offset():
    assert not needs_int64(torch.empty(2, 3, 5, 7), None, torch.empty(0))
    # a (1, 1, 40, 16) view whose rows lie 2**26 elements apart: row 39 starts past 2**31
    assert needs_int64(strided((1, 1, 40, 16), (0, 0, 2 ** 26, 1)))
    assert not needs_int64(strided((2 ** 20, 2 ** 12), (0, 0)))  # stride 0: every offset is 0
    # (B, L, H, E) = (1, 2**20, 32, 64) viewed as (B, H, L, E): L * H * E = 2**31
    assert needs_int64(strided((1, 32, 2 ** 20, 64), (2 ** 31, 64, 32 * 64, 1)))
    # the masked lanes of a last tile count too: 2**31 - 100 elements of data, plus padding
    assert needs_int64(strided((2 ** 31 - 100,), (1,)))
    assert not needs_int64(strided((2 ** 30,), (1,)))


@pytest.mark.parametrize("op", ["se", "eca", "cbam"])
def test_channel_ops_run_the_reference_for_huge_samples(op, monkeypatch):
    """The per-sample limit lowered to 1000 elements stands in for 2**31: the op warns once and
    returns the reference's result (its gradients too)."""
    monkeypatch.setattr(se_ops, "INT32_OFFSET_LIMIT", 1000)
    monkeypatch.setattr(attn_fast.dispatch, "_warned", set())
    x = rand(2, 6, 5, 5)
    assert se_ops.sample_too_large(x) is not None
    if op == "se":
        fast, ref = attn_fast.squeeze_excite, reference.squeeze_excite
        inputs = dict(x=x, fc1_weight=rand(2, 6), fc2_weight=rand(6, 2))
    elif op == "eca":
        fast, ref = attn_fast.efficient_channel_attention, reference.efficient_channel_attention
        inputs = dict(x=x, conv_weight=rand(1, 1, 3))
    else:
        fast, ref = attn_fast.cbam, reference.cbam
        inputs = dict(x=x, fc1_weight=rand(2, 6), fc2_weight=rand(6, 2), conv_weight=rand(1, 2, 3, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_op(fast, ref, inputs, grad=tuple(inputs))
    assert any("2**31" in str(w.message) for w in caught), [str(w.message) for w in caught]
