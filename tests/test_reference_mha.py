"""reference.multi_head_attention against torch.nn.MultiheadAttention (float64, tight tolerance)."""
import pytest
import torch
from torch import nn

from attn_fast import reference
from numerics import rand

TOL = dict(rtol=1e-10, atol=1e-10)


def run_both(mha: nn.MultiheadAttention, q, k, v, **kw):
    mha = mha.double().eval()
    theirs = mha(q, k, v, **kw)
    ours = reference.multi_head_attention(
        q, k, v, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias,
        q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight,
        bias_k=mha.bias_k, bias_v=mha.bias_v, add_zero_attn=mha.add_zero_attn, batch_first=mha.batch_first, **kw)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    if theirs[1] is None:
        assert ours[1] is None
    else:
        torch.testing.assert_close(ours[1], theirs[1], **TOL)
    # gradients of the output w.r.t. inputs and parameters agree too
    g = torch.randn_like(theirs[0])
    params = [p for p in mha.parameters()]
    inputs = [t for t in (q, k, v) if t.requires_grad]
    ga = torch.autograd.grad(ours[0], inputs + params, g, allow_unused=True)
    gb = torch.autograd.grad(theirs[0], inputs + params, g, allow_unused=True)
    for a, b in zip(ga, gb):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **TOL)


def seq(*shape):
    return rand(*shape, dtype=torch.float64).requires_grad_(True)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_self_attention(batch_first, need_weights, average):
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first)
    x = seq(2, 5, 12) if batch_first else seq(5, 2, 12)
    run_both(mha, x, x, x, need_weights=need_weights, average_attn_weights=average)


def test_cross_attention_kdim_vdim_no_bias():
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, bias=False)
    run_both(mha, seq(4, 2, 8), seq(6, 2, 5), seq(6, 2, 3))


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
def test_bias_kv_and_zero_attn(add_bias_kv, add_zero_attn):
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    pad = torch.rand(2, 6) > 0.7
    pad[:, 0] = False
    run_both(mha, seq(4, 2, 8), seq(6, 2, 8), seq(6, 2, 8), key_padding_mask=pad,
             attn_mask=torch.rand(4, 6) > 0.8)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_dim", [2, 3])
def test_masks(kind, mask_dim):
    mha = nn.MultiheadAttention(8, 2)
    shape = (4, 6) if mask_dim == 2 else (2 * 2, 4, 6)
    if kind == "bool":
        attn_mask = torch.rand(shape) > 0.7
        attn_mask[..., 0] = False
        pad = torch.rand(2, 6) > 0.7
        pad[:, 0] = False
    else:
        attn_mask = rand(*shape, dtype=torch.float64)
        pad = rand(2, 6, dtype=torch.float64)
    run_both(mha, seq(4, 2, 8), seq(6, 2, 8), seq(6, 2, 8), attn_mask=attn_mask, key_padding_mask=pad)


@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_with_its_mask(need_weights):
    mha = nn.MultiheadAttention(8, 2)
    x = seq(5, 2, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    run_both(mha, x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)


def test_is_causal_without_mask_builds_it():
    w = [rand(24, 8, dtype=torch.float64), rand(24, dtype=torch.float64), rand(8, 8, dtype=torch.float64), None]
    x = rand(5, 2, 8, dtype=torch.float64)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    a = reference.multi_head_attention(x, x, x, 2, *w, is_causal=True, need_weights=False)[0]
    b = reference.multi_head_attention(x, x, x, 2, *w, attn_mask=causal, need_weights=False)[0]
    torch.testing.assert_close(a, b, **TOL)


def test_unbatched():
    mha = nn.MultiheadAttention(8, 4)
    run_both(mha, seq(3, 8), seq(5, 8), seq(5, 8), key_padding_mask=torch.tensor([False, True, False, False, True]))


def test_inside_transformer_layer_shapes():
    """The encoder layer's own MHA agrees with the reference on its parameters."""
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True).double().eval()
    x = seq(2, 7, 16)
    run_both(layer.self_attn, x, x, x, need_weights=False)
