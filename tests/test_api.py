"""The public API: results by the numerics rule, input checks with clear errors, dispatch, CLI."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import attn_fast
from attn_fast import dispatch, reference
from numerics import check_op, rand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- results (numerics rule)

def test_sdpa_matches_reference(dtype, device):
    b, h, lq, lk, e = 2, 2, 9, 13, 24
    inputs = dict(query=rand(b, h, lq, e, dtype=dtype, device=device),
                  key=rand(b, h, lk, e, dtype=dtype, device=device),
                  value=rand(b, h, lk, 16, dtype=dtype, device=device),
                  attn_mask=torch.rand(lq, lk, device=device) > 0.3, is_causal=False)
    check_op(attn_fast.scaled_dot_product_attention, reference.scaled_dot_product_attention, inputs,
             grad=("query", "key", "value"))


def test_sdpa_is_a_drop_in_for_torch(device):
    q, k, v = (rand(1, 2, 6, 8, device=device) for _ in range(3))
    torch.testing.assert_close(attn_fast.scaled_dot_product_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
    q3 = rand(2, 6, 8, device=device)  # (H, L, E) works too
    assert attn_fast.scaled_dot_product_attention(q3, q3, q3).shape == (2, 6, 8)


def test_sdpa_strided_bhle_view(device):
    b, length, h, e = 2, 7, 3, 8
    x = rand(b, length, h, e, device=device).transpose(1, 2)  # (B, H, L, E) view, not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(attn_fast.scaled_dot_product_attention(x, x, x),
                               reference.scaled_dot_product_attention(x.contiguous(), x.contiguous(), x.contiguous()))


def test_squeeze_excite_matches_reference(dtype, device):
    n, c, cr = 2, 12, 5
    inputs = dict(x=rand(n, c, 5, 7, dtype=dtype, device=device),
                  fc1_weight=rand(cr, c, 1, 1, dtype=dtype, device=device, scale=0.3),
                  fc1_bias=rand(cr, dtype=dtype, device=device),
                  fc2_weight=rand(c, cr, dtype=dtype, device=device, scale=0.3),
                  fc2_bias=rand(c, dtype=dtype, device=device), activation="silu", gate="hardsigmoid")
    check_op(attn_fast.squeeze_excite, reference.squeeze_excite, inputs,
             grad=("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))


def test_squeeze_excite_single_fc_and_channels_last(device):
    x = rand(2, 6, 4, 4, device=device).to(memory_format=torch.channels_last)
    w = rand(6, 6, device=device)
    y = attn_fast.squeeze_excite(x, w, gate="hardsigmoid", pool="avgmax")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, reference.squeeze_excite(x.contiguous(), w, gate="hardsigmoid", pool="avgmax"))


def test_cbam_matches_reference(dtype, device):
    n, c, cr = 2, 8, 2
    inputs = dict(x=rand(n, c, 6, 5, dtype=dtype, device=device),
                  fc1_weight=rand(cr, c, dtype=dtype, device=device, scale=0.3),
                  fc2_weight=rand(c, cr, dtype=dtype, device=device, scale=0.3),
                  conv_weight=rand(1, 2, 3, 3, dtype=dtype, device=device, scale=0.3))
    check_op(attn_fast.cbam, reference.cbam, inputs, grad=("x", "fc1_weight", "fc2_weight", "conv_weight"))


def test_cbam_training_batchnorm_updates_running_stats(device):
    x = rand(3, 8, 5, 5, device=device)
    args = (rand(2, 8, device=device), rand(8, 2, device=device), rand(1, 1, 7, 7, device=device))
    stats = [torch.zeros(1, device=device), torch.ones(1, device=device)]
    ref_stats = [t.clone() for t in stats]
    y = attn_fast.cbam(x, *args, light=True, bn_running_mean=stats[0], bn_running_var=stats[1],
                       bn_training=True)
    y_ref = reference.cbam(x, *args, light=True, bn_running_mean=ref_stats[0], bn_running_var=ref_stats[1],
                           bn_training=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(stats, ref_stats)
    assert stats[0].item() != 0.0


# ---------------------------------------------------------------- input checks

def _qkv(**over):
    t = dict(query=rand(2, 4, 5, 8), key=rand(2, 4, 6, 8), value=rand(2, 4, 6, 8))
    t.update(over)
    return t


SDPA_BAD = [
    ("query not a tensor", dict(query=[1.0]), TypeError, "query must be a torch.Tensor"),
    ("query 1-D", dict(query=rand(8)), ValueError, r"must be at least 2-D"),
    ("integer query", dict(query=torch.ones(2, 4, 5, 8, dtype=torch.int32)), TypeError, "query must have dtype"),
    ("dtypes differ", dict(key=rand(2, 4, 6, 8, dtype=torch.float16)), TypeError, "key has dtype"),
    ("batch differs", dict(key=rand(3, 4, 6, 8), value=rand(3, 4, 6, 8)), ValueError, "batch dims do not broadcast"),
    ("head size differs", dict(key=rand(2, 4, 6, 7)), ValueError, "key head size 7 != query head size 8"),
    ("value length", dict(value=rand(2, 4, 5, 8)), ValueError, "value length 5 != key length 6"),
    ("kv heads differ", dict(value=rand(2, 2, 6, 8)), ValueError, "query has 4 heads but key has 4 and value 2"),
    ("gqa not enabled", dict(key=rand(2, 2, 6, 8), value=rand(2, 2, 6, 8)), ValueError, "enable_gqa=True"),
    ("gqa not divisible", dict(key=rand(2, 3, 6, 8), value=rand(2, 3, 6, 8), enable_gqa=True), ValueError,
     "multiple of key/value heads"),
    ("head size > 256", dict(query=rand(1, 1, 2, 257), key=rand(1, 1, 2, 257), value=rand(1, 1, 2, 4)),
     ValueError, "head size must be at most 256"),
    ("mask int", dict(attn_mask=torch.ones(5, 6, dtype=torch.int64)), TypeError, "attn_mask must have dtype"),
    ("mask float dtype", dict(attn_mask=rand(5, 6, dtype=torch.float64)), TypeError, "attn_mask must have dtype"),
    ("mask shape", dict(attn_mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, "does not broadcast"),
    ("mask rank 5", dict(attn_mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)), ValueError, "does not broadcast"),
    ("dropout negative", dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout NaN", dict(dropout_p=float("nan")), ValueError, "dropout_p must be in"),
    ("dropout one", dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    ("dropout tensor", dict(dropout_p=torch.tensor(0.1)), TypeError, "dropout_p must be a float"),
    ("scale NaN", dict(scale=float("nan")), ValueError, "scale must be finite"),
    ("scale string", dict(scale="0.1"), TypeError, "scale must be a float"),
    ("is_causal not bool", dict(is_causal=1), TypeError, "is_causal must be a bool"),
    ("alignment", dict(is_causal=True, causal_alignment="bottom"), ValueError, "causal_alignment must be one of"),
]


@pytest.mark.parametrize("case", SDPA_BAD, ids=[c[0] for c in SDPA_BAD])
def test_sdpa_bad_input(case):
    _, over, exc, match = case
    with pytest.raises(exc, match=match):
        attn_fast.scaled_dot_product_attention(**_qkv(**over))


def test_devices_differ():
    """A tensor on another device (the meta device stands in for a second GPU) is named."""
    with pytest.raises(ValueError, match="key is on meta but query is on cpu"):
        attn_fast.scaled_dot_product_attention(**_qkv(key=rand(2, 4, 6, 8).to("meta")))
    with pytest.raises(ValueError, match="fc2_weight is on meta"):
        attn_fast.squeeze_excite(**_se(fc2_weight=rand(8, 2).to("meta")))
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        attn_fast.scaled_dot_product_attention(**_qkv(attn_mask=torch.ones(5, 6, dtype=torch.bool, device="meta")))


def _se(**over):
    t = dict(x=rand(2, 8, 3, 3), fc1_weight=rand(2, 8), fc1_bias=rand(2), fc2_weight=rand(8, 2), fc2_bias=rand(8))
    t.update(over)
    return t


SE_BAD = [
    ("x 3-D", dict(x=rand(8, 3, 3)), ValueError, r"x must be 4-D \(N, C, H, W\)"),
    ("x 5-D", dict(x=rand(1, 8, 3, 3, 3)), ValueError, "x must be 4-D"),
    ("x int", dict(x=torch.ones(2, 8, 3, 3, dtype=torch.int64)), TypeError, "x must have dtype"),
    ("fc1 channels", dict(fc1_weight=rand(2, 7)), ValueError, r"fc1_weight must have shape \(2, 8\)"),
    ("fc1 kernel 3x3", dict(fc1_weight=rand(2, 8, 3, 3)), ValueError, "1x1 conv weight"),
    ("fc1 bias", dict(fc1_bias=rand(3)), ValueError, r"fc1_bias must have shape \(2,\)"),
    ("fc2 shape", dict(fc2_weight=rand(8, 3)), ValueError, r"fc2_weight must have shape \(8, 2\)"),
    ("fc2 bias", dict(fc2_bias=rand(2)), ValueError, r"fc2_bias must have shape \(8,\)"),
    ("single fc not square", dict(fc2_weight=None, fc2_bias=None), ValueError, r"fc1_weight must have shape \(8, 8\)"),
    ("fc2 bias without fc2", dict(fc1_weight=rand(8, 8), fc1_bias=rand(8), fc2_weight=None), ValueError,
     "fc2_bias was given without fc2_weight"),
    ("weight dtype", dict(fc1_weight=rand(2, 8, dtype=torch.float16)), TypeError, "fc1_weight has dtype"),
    ("activation", dict(activation="swish"), ValueError, "activation must be one of"),
    ("gate", dict(gate="tanh"), ValueError, "gate must be one of"),
    ("pool", dict(pool="max"), ValueError, "pool must be one of"),
]


@pytest.mark.parametrize("case", SE_BAD, ids=[c[0] for c in SE_BAD])
def test_squeeze_excite_bad_input(case):
    _, over, exc, match = case
    with pytest.raises(exc, match=match):
        attn_fast.squeeze_excite(**_se(**over))


def _cbam(**over):
    t = dict(x=rand(2, 8, 5, 5), fc1_weight=rand(2, 8), fc2_weight=rand(8, 2), conv_weight=rand(1, 2, 7, 7))
    t.update(over)
    return t


CBAM_BAD = [
    ("x 3-D", dict(x=rand(8, 5, 5)), ValueError, "x must be 4-D"),
    ("fc2 shape", dict(fc2_weight=rand(7, 2)), ValueError, r"fc2_weight must have shape \(8, 2\)"),
    ("conv channels", dict(conv_weight=rand(1, 1, 7, 7)), ValueError, r"conv_weight must have shape \(1, 2, k, k\)"),
    ("conv light channels", dict(conv_weight=rand(1, 2, 7, 7), light=True), ValueError, r"\(1, 1, k, k\)"),
    ("conv even k", dict(conv_weight=rand(1, 2, 4, 4)), ValueError, "k odd"),
    ("conv not square", dict(conv_weight=rand(1, 2, 7, 5)), ValueError, "conv_weight must have shape"),
    ("conv bias", dict(conv_bias=rand(2)), ValueError, r"conv_bias must have shape \(1,\)"),
    ("bn var missing", dict(bn_running_mean=rand(1)), ValueError, "bn_running_mean and bn_running_var"),
    ("bn eval no stats", dict(bn_weight=rand(1)), ValueError, "eval mode"),
    ("bn shape", dict(bn_running_mean=rand(2), bn_running_var=rand(2)), ValueError, "bn_running_mean must have shape"),
    ("spatial order", dict(spatial_order="avg_max"), ValueError, "spatial_order must be one of"),
    ("bn momentum None", dict(bn_momentum=None), ValueError, "bn_momentum must be a float"),
    ("light not bool", dict(light="yes"), TypeError, "light must be a bool"),
]


@pytest.mark.parametrize("case", CBAM_BAD, ids=[c[0] for c in CBAM_BAD])
def test_cbam_bad_input(case):
    _, over, exc, match = case
    with pytest.raises(exc, match=match):
        attn_fast.cbam(**_cbam(**over))


# ---------------------------------------------------------------- dispatch

def test_route_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.route("cbam", cpu, torch.float32).path == "reference"
    assert dispatch.route("cbam", cpu, torch.float64).reason == "float64 runs the reference"
    attn_fast.set_backend("reference")
    assert dispatch.route("cbam", cuda, torch.float16, warn=False).reason == "backend forced to 'reference'"
    attn_fast.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.route("cbam", cpu, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(dispatch.OPS, "cbam", True)
    assert dispatch.route("cbam", cpu, torch.float32).path == "triton"
    assert dispatch.route("cbam", cuda, torch.bfloat16).path == "triton"
    with pytest.warns(RuntimeWarning, match="does not cover odd widths"):
        r = dispatch.route("cbam", cuda, torch.bfloat16, unsupported="odd widths")
    assert r.path == "reference"
    with pytest.raises(KeyError):
        dispatch.route("nope", cpu, torch.float32)


def test_route_to_the_cpu_path(monkeypatch):
    """CPU tensors take the CPU path: attention's (torch's fused CPU kernels) and squeeze-excite's
    own, the reference for the ops without one; set_backend("cpu") asks for it under the interpreter too, and forward-mode
    AD / torch.func transforms take the reference (torch's fused CPU kernels have no forward AD)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    sdpa = "scaled_dot_product_attention"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.route(sdpa, cpu, torch.float32).path == "cpu"
    assert dispatch.route(sdpa, cpu, torch.float64).path == "reference"
    assert dispatch.route("squeeze_excite", cpu, torch.float32).path == "cpu"
    assert dispatch.route("efficient_channel_attention", cpu, torch.float32).path == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.route(sdpa, cpu, torch.float32).path == "triton"
    attn_fast.set_backend("cpu")
    assert dispatch.route(sdpa, cpu, torch.bfloat16).path == "cpu"
    assert dispatch.route("cbam", cpu, torch.float32).path == "reference"
    assert dispatch.route(sdpa, cuda, torch.float16).path == "triton"
    q = torch.randn(1, 1, 3, 4)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(q, torch.ones_like(q))
        assert dispatch.route(sdpa, cpu, torch.float32, tensors=(dual,)).path == "reference"
    monkeypatch.setenv("ATTN_FAST_BACKEND", "cpu")
    attn_fast.set_backend(None)
    assert attn_fast.get_backend() == "cpu"


def test_missing_kernel_warns_once(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setitem(dispatch.OPS, "squeeze_excite", False)
    with pytest.warns(RuntimeWarning, match="no Triton kernel for squeeze_excite"):
        dispatch.route("squeeze_excite", torch.device("cuda"), torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.route("squeeze_excite", torch.device("cuda"), torch.float16)


def test_set_backend_and_env(monkeypatch):
    monkeypatch.delenv("ATTN_FAST_BACKEND", raising=False)
    assert attn_fast.get_backend() == "auto"
    monkeypatch.setenv("ATTN_FAST_BACKEND", "Reference")
    assert attn_fast.get_backend() == "reference"
    attn_fast.set_backend("triton")
    assert attn_fast.get_backend() == "triton"
    attn_fast.set_backend(None)
    assert attn_fast.get_backend() == "reference"
    monkeypatch.setenv("ATTN_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ATTN_FAST_BACKEND must be one of"):
        attn_fast.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        attn_fast.set_backend("fast")


def test_forced_reference_still_computes(device):
    attn_fast.set_backend("reference")
    q = rand(1, 1, 4, 8, device=device)
    torch.testing.assert_close(attn_fast.scaled_dot_product_attention(q, q, q),
                               reference.scaled_dot_product_attention(q, q, q))


def test_info_cli():
    env = dict(os.environ, ATTN_FAST_BACKEND="auto")
    out = subprocess.run([sys.executable, "-m", "attn_fast", "info"], capture_output=True, text=True,
                         cwd=ROOT, env=env, check=True).stdout
    assert f"attn_fast {attn_fast.__version__}" in out
    assert f"torch     {torch.__version__}" in out and "triton" in out and "Triton interpreter" in out
    for op in dispatch.OPS:
        assert op in out
    assert "float64 runs the reference" in out
