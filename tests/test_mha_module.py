"""attn_fast.nn.MultiheadAttention against torch.nn.MultiheadAttention: ``from_module`` shares the
original's parameters, and with need_weights=False (the fused kernel) outputs, input and parameter
gradients match torch's module run in float64 by the numerics rule, for self and cross attention,
both batch layouts, unbatched inputs, every mask kind and combination, bias_k/bias_v and
add_zero_attn; need_weights=True returns torch's own weights."""
import copy
import warnings

import pytest
import torch
from torch import nn

from attn_fast.nn import MultiheadAttention, UnsupportedLayerError
from numerics import check_op, rand


def randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return module


def check_mha(original: nn.MultiheadAttention, query, key=None, value=None, *, grad_inputs=("query",), **kw):
    """Compare the converted module (need_weights=False) with the original by the rule: output and the
    gradients of the named inputs and of every parameter."""
    original = randomize(original).eval()
    fast = MultiheadAttention.from_module(copy.deepcopy(original))
    assert list(fast.state_dict()) == list(original.state_dict())
    names = [n for n, _ in original.named_parameters()]
    self_attn = key is None
    inputs = {"query": query, **({} if self_attn else {"key": key, "value": value}),
              **{n: p.detach().to(query.dtype) for n, p in original.named_parameters()}}
    masks = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    copies = {}

    def run(module, query, key=None, value=None, **params):
        mod = copies.setdefault((id(module), query.dtype), copy.deepcopy(module).to(query.dtype))
        k, v = (query, query) if self_attn else (key, value)
        extra = {**kw, **{n: (m.to(query.dtype) if m.is_floating_point() else m) for n, m in masks.items()}}
        out, weights = torch.func.functional_call(mod, params, (query, k, v), dict(need_weights=False, **extra))
        assert weights is None
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the reference
        return check_op(lambda **a: run(fast, **a), lambda **a: run(original, **a), inputs,
                        grad=[*grad_inputs, *names])


def seq(n, length, e, *, dtype=torch.float32, device="cpu", batch_first=False):
    return rand(n, length, e, dtype=dtype, device=device) if batch_first else rand(length, n, e, dtype=dtype,
                                                                                    device=device)


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention(batch_first, dtype, device):
    m = nn.MultiheadAttention(16, 2, batch_first=batch_first).to(device)
    check_mha(m, seq(2, 5, 16, dtype=dtype, device=device, batch_first=batch_first))


@pytest.mark.parametrize("kv_same", [False, True], ids=["k_ne_v", "k_is_v"])
def test_cross_attention_with_other_widths(kv_same, device):
    if kv_same:
        m = nn.MultiheadAttention(16, 4, batch_first=True).to(device)
        mem = seq(2, 7, 16, device=device, batch_first=True)
        check_mha(m, seq(2, 3, 16, device=device, batch_first=True), mem, mem, grad_inputs=("query", "key"))
    else:
        m = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, bias=False).to(device)
        check_mha(m, seq(2, 3, 16, device=device), seq(2, 7, 12, device=device), seq(2, 7, 10, device=device),
                  grad_inputs=("query", "key", "value"))


def _keep_one(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (True = masked) with key 0 always allowed, so no row is fully masked."""
    mask = mask.clone()
    mask[..., 0] = False
    return mask


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch deprecates it; still works
@pytest.mark.parametrize("kind", ["kpm_bool", "kpm_float", "attn_bool_2d", "attn_float_3d", "both_bool",
                                  "bool_and_float"])
def test_masks(kind, device):
    n, h, l, s = 2, 2, 4, 6
    m = nn.MultiheadAttention(16, h).to(device)
    kpm = _keep_one(torch.rand(n, s, device=device) < 0.4)
    attn2 = _keep_one(torch.rand(l, s, device=device) < 0.4)
    attn3 = rand(n * h, l, s, device=device)
    masks = {
        "kpm_bool": dict(key_padding_mask=kpm),
        "kpm_float": dict(key_padding_mask=rand(n, s, device=device)),
        "attn_bool_2d": dict(attn_mask=attn2),
        "attn_float_3d": dict(attn_mask=attn3),
        "both_bool": dict(attn_mask=attn2, key_padding_mask=kpm),
        "bool_and_float": dict(attn_mask=attn3, key_padding_mask=kpm),
    }[kind]
    check_mha(m, seq(n, l, 16, device=device), seq(n, s, 16, device=device), seq(n, s, 16, device=device),
              grad_inputs=("query", "key", "value"), **masks)


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True), (True, True)])
def test_bias_kv_and_zero_attn(add_bias_kv, add_zero_attn, device):
    m = nn.MultiheadAttention(16, 2, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn).to(device)
    kpm = _keep_one(torch.rand(2, 5, device=device) < 0.4)
    check_mha(m, seq(2, 5, 16, device=device), key_padding_mask=kpm)


def test_causal_hint(device):
    m = nn.MultiheadAttention(16, 2, batch_first=True).to(device)
    causal = nn.Transformer.generate_square_subsequent_mask(5, device=device)
    check_mha(m, seq(2, 5, 16, device=device, batch_first=True), attn_mask=causal, is_causal=True)
    with pytest.raises(RuntimeError, match="pass attn_mask"):
        MultiheadAttention(16, 2)(rand(5, 2, 16), rand(5, 2, 16), rand(5, 2, 16), need_weights=False, is_causal=True)


def test_unbatched(device):
    m = nn.MultiheadAttention(16, 4).to(device)
    check_mha(m, rand(5, 16, device=device), rand(7, 16, device=device), rand(7, 16, device=device),
              grad_inputs=("query", "key", "value"), key_padding_mask=_keep_one(torch.rand(7, device=device) < 0.4))


def test_need_weights_returns_torchs_weights():
    torch.manual_seed(0)
    original = randomize(nn.MultiheadAttention(16, 4)).eval()
    fast = MultiheadAttention.from_module(original)
    x = rand(5, 2, 16)
    for avg in (True, False):
        want = original(x, x, x, average_attn_weights=avg)
        got = fast(x, x, x, average_attn_weights=avg)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("batch_first", [False, True])
def test_need_weights_accepts_every_mask_torch_accepts(batch_first):
    """The mask checks that run before torch's own path (need_weights=True) reject nothing torch
    takes: 2-D and 3-D attn_mask, bool and float, key_padding_mask, batched and unbatched, with
    bias_k/add_zero_attn (which pad the masks inside torch)."""
    torch.manual_seed(0)
    original = randomize(nn.MultiheadAttention(16, 4, batch_first=batch_first, add_bias_kv=True,
                                               add_zero_attn=True)).eval()
    fast = MultiheadAttention.from_module(original)
    n, l_q, l_k = 2, 5, 7
    q = rand(n, l_q, 16) if batch_first else rand(l_q, n, 16)
    kv = rand(n, l_k, 16) if batch_first else rand(l_k, n, 16)
    masks = [dict(attn_mask=torch.rand(l_q, l_k) < 0.3),
             dict(attn_mask=rand(n * 4, l_q, l_k)),
             dict(key_padding_mask=torch.rand(n, l_k) < 0.3),
             dict(attn_mask=torch.rand(l_q, l_k) < 0.3, key_padding_mask=torch.rand(n, l_k) < 0.3)]
    for kw in masks:
        for fast_kw in (dict(need_weights=True), dict(need_weights=False)):
            want = original(q, kv, kv, **kw, **fast_kw)
            got = fast(q, kv, kv, **kw, **fast_kw)
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
            if fast_kw["need_weights"]:
                torch.testing.assert_close(got[1], want[1])
    uq, ukv = rand(l_q, 16), rand(l_k, 16)  # unbatched: (S,) padding, (heads, L, S) masks
    for kw in (dict(attn_mask=rand(4, l_q, l_k)), dict(key_padding_mask=torch.rand(l_k) < 0.3)):
        for need in (True, False):
            torch.testing.assert_close(fast(uq, ukv, ukv, need_weights=need, **kw)[0],
                                       original(uq, ukv, ukv, need_weights=need, **kw)[0], rtol=1e-4, atol=1e-5)


def test_from_module_shares_parameters_and_keeps_the_type_contract():
    original = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, add_bias_kv=True)
    fast = MultiheadAttention.from_module(original)
    assert isinstance(fast, nn.MultiheadAttention)
    mine = dict(fast.named_parameters())
    assert all(mine[n] is p for n, p in original.named_parameters())
    fast.register_forward_hook(lambda *a: None)
    assert not original._forward_hooks, "hooks of the converted module leaked into the original"
    with pytest.raises(UnsupportedLayerError):
        MultiheadAttention.from_module(nn.Linear(4, 4))


def test_constructor_matches_torch_state_dict():
    mine, theirs = MultiheadAttention(32, 4, bias=False, kdim=16, vdim=24), nn.MultiheadAttention(32, 4, bias=False,
                                                                                                   kdim=16, vdim=24)
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    mine.load_state_dict(theirs.state_dict())
    q, kv = rand(3, 2, 32), rand(4, 2, 16)
    v = rand(4, 2, 24)
    torch.testing.assert_close(mine(q, kv, v, need_weights=False)[0], theirs(q, kv, v, need_weights=False)[0],
                               rtol=1e-4, atol=1e-5)


def test_dropout_in_training_is_reproducible_and_active(device):
    m = MultiheadAttention(16, 2, dropout=0.5, batch_first=True).to(device).train()
    x = rand(2, 6, 16, device=device)
    torch.manual_seed(1)
    a = m(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    b = m(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, m.eval()(x, x, x, need_weights=False)[0])


def test_bad_input_is_named():
    m = MultiheadAttention(16, 2)
    with pytest.raises(ValueError, match="query must have 16 features"):
        m(rand(5, 2, 8), rand(5, 2, 16), rand(5, 2, 16), need_weights=False)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        m(rand(5, 2, 16), rand(5, 2, 16), rand(5, 2, 16), key_padding_mask=torch.zeros(3, 5, dtype=torch.bool),
          need_weights=False)
    with pytest.raises(ValueError, match="3-D attn_mask"):
        m(rand(5, 2, 16), rand(5, 2, 16), rand(5, 2, 16), attn_mask=torch.zeros(3, 5, 5), need_weights=False)
