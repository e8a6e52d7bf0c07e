"""The shortcuts that keep a call's Python cost small on the CPU (issue 19): the public functions
skip their full checks for an ordinary call that a few comparisons prove valid, the SE modules skip
their casts outside autocast, and squeeze-excite's CPU path makes fewer torch calls. Each shortcut
must give what the full path gives, and every call it does not prove valid, every invalid one
included, must still take the full checks and their errors."""
from __future__ import annotations

import pytest
import torch

import attn_fast
from attn_fast import dispatch, functional, reference
from attn_fast.ops import squeeze_excite_cpu
from numerics import check_op, rand

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture
def full_checks(monkeypatch):
    """Counts the calls that took the full checks (the broadcast of q/k/v, the image check)."""
    seen = []
    broadcast, image = functional._broadcast_qkv, functional._check_image

    def spy_broadcast(*args):
        seen.append("attention")
        return broadcast(*args)

    def spy_image(*args, **kwargs):
        seen.append("image")
        return image(*args, **kwargs)

    monkeypatch.setattr(functional, "_broadcast_qkv", spy_broadcast)
    monkeypatch.setattr(functional, "_check_image", spy_image)
    return seen


@pytest.fixture
def cpu_path():
    attn_fast.set_backend("cpu")
    yield
    attn_fast.set_backend(None)


def _qkv(lq=5, lk=7, e=8, ev=8, dtype=F32, b=2, h=3):
    return rand(b, h, lq, e, dtype=dtype), rand(b, h, lk, e, dtype=dtype), rand(b, h, lk, ev, dtype=dtype)


@pytest.mark.parametrize("kwargs", [
    {}, dict(is_causal=True), dict(scale=0.3), dict(dropout_p=0.0),
    dict(attn_mask="bool (B, 1, 1, Lk)"), dict(attn_mask="float (1, H, Lq, Lk)"),
], ids=str)
def test_ordinary_attention_skips_the_checks_and_matches_them(kwargs, full_checks, cpu_path, monkeypatch):
    q, k, v = _qkv()
    if kwargs.get("attn_mask", "").startswith("bool"):
        kwargs = dict(attn_mask=torch.rand(2, 1, 1, 7) > 0.3)
    elif kwargs.get("attn_mask", "").startswith("float"):
        kwargs = dict(attn_mask=rand(1, 3, 5, 7))
    fast = attn_fast.scaled_dot_product_attention(q, k, v, **kwargs)
    assert full_checks == []
    monkeypatch.setattr(functional, "_ordinary_attention", lambda *a: False)
    slow = attn_fast.scaled_dot_product_attention(q, k, v, **kwargs)
    assert full_checks == ["attention"]
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("case", [
    "3-D", "enable_gqa", "2-D mask", "int dropout", "numpy scale", "lower_right", "deterministic", "Parameter",
    "broadcast batch", "head size 0",
])
def test_other_attention_calls_take_the_checks(case, full_checks, cpu_path):
    q, k, v = _qkv()
    kwargs = {}
    if case == "3-D":
        q, k, v = q[0], k[0], v[0]
    elif case == "enable_gqa":
        kwargs["enable_gqa"] = True
    elif case == "2-D mask":
        kwargs["attn_mask"] = torch.rand(5, 7) > 0.3
    elif case == "int dropout":
        kwargs["dropout_p"] = 0
    elif case == "numpy scale":
        np = pytest.importorskip("numpy")
        kwargs["scale"] = np.float32(0.5)
    elif case == "lower_right":
        kwargs.update(is_causal=True, causal_alignment="lower_right")
    elif case == "deterministic":
        kwargs["deterministic"] = True
    elif case == "Parameter":
        q = torch.nn.Parameter(q)
    elif case == "broadcast batch":
        k, v = k[:1], v[:1]
    elif case == "head size 0":
        q, k = q[..., :0], k[..., :0]
    out = attn_fast.scaled_dot_product_attention(q, k, v, **kwargs)
    assert full_checks == ["attention"]
    assert out.shape[-2:] == (5, 8)


@pytest.mark.parametrize("case,error", [
    ("dtype", TypeError), ("device", ValueError), ("head size 300", ValueError), ("mask shape", ValueError),
    ("mask dtype", TypeError), ("nan dropout", ValueError), ("inf scale", ValueError), ("value length", ValueError),
    ("is_causal int", TypeError),
])
def test_invalid_attention_calls_still_get_the_errors(case, error, cpu_path):
    q, k, v = _qkv()
    kwargs = {}
    if case == "dtype":
        k = k.double()
    elif case == "device":
        k = k.to("meta")
    elif case == "head size 300":
        q, k = rand(2, 3, 5, 300), rand(2, 3, 7, 300)
    elif case == "mask shape":
        kwargs["attn_mask"] = torch.rand(2, 1, 2, 7) > 0.5
    elif case == "mask dtype":
        kwargs["attn_mask"] = torch.ones(2, 1, 1, 7, dtype=torch.int64)
    elif case == "nan dropout":
        kwargs["dropout_p"] = float("nan")
    elif case == "inf scale":
        kwargs["scale"] = float("inf")
    elif case == "value length":
        v = rand(2, 3, 6, 8)
    elif case == "is_causal int":
        kwargs["is_causal"] = 1
    with pytest.raises(error, match="scaled_dot_product_attention"):
        attn_fast.scaled_dot_product_attention(q, k, v, **kwargs)


def _se_inputs(dtype=F32, c=12, cr=4, conv=True, biases=True, channels_last=False):
    x = rand(2, c, 5, 3, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1, w2 = rand(cr, c, dtype=dtype, scale=0.5), rand(c, cr, dtype=dtype, scale=0.5)
    if conv:
        w1, w2 = w1[:, :, None, None], w2[:, :, None, None]
    b1, b2 = (rand(cr, dtype=dtype), rand(c, dtype=dtype)) if biases else (None, None)
    return dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)


def test_ordinary_squeeze_excite_skips_the_checks_and_matches_them(full_checks, cpu_path, monkeypatch):
    inputs = _se_inputs()
    fast = attn_fast.squeeze_excite(**inputs, activation="silu", gate="hardsigmoid")
    assert full_checks == []
    monkeypatch.setattr(functional, "_ordinary_squeeze_excite", lambda *a: False)
    slow = attn_fast.squeeze_excite(**inputs, activation="silu", gate="hardsigmoid")
    assert full_checks == ["image"]
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("case,error", [
    ("fc1 shape", ValueError), ("fc2 shape", ValueError), ("bias shape", ValueError), ("dtype", TypeError),
    ("activation", ValueError), ("pool", ValueError), ("3-D x", ValueError), ("1x3 conv weight", ValueError),
    ("single fc not square", ValueError), ("fc2_bias without fc2", ValueError), ("0-D fc1", ValueError),
])
def test_invalid_squeeze_excite_calls_still_get_the_errors(case, error, cpu_path):
    inputs, kwargs = _se_inputs(), {}
    if case == "fc1 shape":
        inputs["fc1_weight"] = rand(4, 11, 1, 1)
    elif case == "fc2 shape":
        inputs["fc2_weight"] = rand(12, 5)
    elif case == "bias shape":
        inputs["fc1_bias"] = rand(5)
    elif case == "dtype":
        inputs["fc2_bias"] = inputs["fc2_bias"].double()
    elif case == "activation":
        kwargs["activation"] = "tanh"
    elif case == "pool":
        kwargs["pool"] = "max"
    elif case == "3-D x":
        inputs["x"] = inputs["x"][0]
    elif case == "1x3 conv weight":
        inputs["fc1_weight"] = rand(4, 12, 1, 3)
    elif case == "single fc not square":
        inputs.update(fc2_weight=None, fc2_bias=None)
    elif case == "0-D fc1":
        inputs["fc1_weight"] = rand(())
    elif case == "fc2_bias without fc2":
        inputs.update(fc1_weight=rand(12, 12), fc1_bias=rand(12), fc2_weight=None)
    with pytest.raises(error, match="squeeze_excite"):
        attn_fast.squeeze_excite(**inputs, **kwargs)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("variant", ["conv weights", "linear weights", "channels_last", "single fc", "no biases",
                                     "avgmax"])
@pytest.mark.parametrize("activation,gate", [("relu", "sigmoid"), ("hardswish", "hardsigmoid")])
def test_squeeze_excite_cpu_path_against_the_reference(variant, activation, gate, dtype, cpu_path):
    """The CPU path (sum folded into fc1's matmul, in-place ReLU / sigmoid, a view for the gate), and
    its fallbacks to the reference: output and every gradient by the numerics rule."""
    assert dispatch.route("squeeze_excite", torch.device("cpu"), dtype, warn=False).path == "cpu"
    inputs = _se_inputs(dtype, conv=variant != "linear weights", biases=variant != "no biases",
                        channels_last=variant == "channels_last")
    pool = "avgmax" if variant == "avgmax" else "avg"
    if variant == "single fc":
        inputs.update(fc1_weight=rand(12, 12, dtype=dtype, scale=0.5), fc1_bias=rand(12, dtype=dtype),
                      fc2_weight=None, fc2_bias=None)
    inputs = {n: t for n, t in inputs.items() if t is not None}
    kw = dict(activation=activation, gate=gate, pool=pool)
    check_op(lambda **a: attn_fast.squeeze_excite(**a, **kw), lambda **a: reference.squeeze_excite(**a, **kw),
             inputs, grad=list(inputs), dtype=dtype)
    out = squeeze_excite_cpu.squeeze_excite(*(inputs.get(n) for n in ("x", "fc1_weight", "fc1_bias", "fc2_weight",
                                                                      "fc2_bias")), activation, gate, pool, None)
    fmt = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_se_module_shortcut_outside_autocast_and_casts_under_it(cpu_path):
    """The SE modules' shortcut (no casts, no autocast context) gives the full path's result; under
    autocast the full path still casts the parameters to x's dtype."""
    m = attn_fast.nn.SqueezeExcite(12, 4).eval()
    x = rand(2, 12, 5, 3)
    with torch.no_grad():
        want = reference.squeeze_excite(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)
        torch.testing.assert_close(m(x), want)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="channels"):
        m(rand(2, 11, 5, 3))


def test_ordinary_cbam_skips_the_checks_and_matches_them(full_checks, monkeypatch):
    x = rand(2, 12, 5, 3)
    inputs = dict(x=x, fc1_weight=rand(4, 12, 1, 1, scale=0.5), fc2_weight=rand(12, 4, 1, 1, scale=0.5),
                  conv_weight=rand(1, 2, 3, 3, scale=0.3), bn_weight=torch.ones(1), bn_bias=torch.zeros(1),
                  bn_running_mean=torch.zeros(1), bn_running_var=torch.ones(1))
    fast = attn_fast.cbam(**inputs)
    assert full_checks == []
    monkeypatch.setattr(functional, "_ordinary_cbam", lambda *a: False)
    slow = attn_fast.cbam(**inputs)
    assert full_checks == ["image"]
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("case,error", [
    ("conv shape", ValueError), ("even kernel", ValueError), ("bn shape", ValueError), ("one running stat", ValueError),
    ("eval without stats", ValueError), ("momentum", ValueError), ("light conv", ValueError), ("order", ValueError),
])
def test_invalid_cbam_calls_still_get_the_errors(case, error):
    inputs = dict(x=rand(2, 12, 5, 3), fc1_weight=rand(4, 12), fc2_weight=rand(12, 4), conv_weight=rand(1, 2, 3, 3))
    if case == "conv shape":
        inputs["conv_weight"] = rand(1, 3, 3, 3)
    elif case == "even kernel":
        inputs["conv_weight"] = rand(1, 2, 4, 4)
    elif case == "bn shape":
        inputs.update(bn_weight=torch.ones(2), bn_running_mean=torch.zeros(1), bn_running_var=torch.ones(1))
    elif case == "one running stat":
        inputs["bn_running_mean"] = torch.zeros(1)
    elif case == "eval without stats":
        inputs["bn_weight"] = torch.ones(1)
    elif case == "momentum":
        inputs.update(bn_momentum=1.5)
    elif case == "light conv":
        inputs["light"] = True
    elif case == "order":
        inputs["spatial_order"] = "avg_max"
    with pytest.raises(error, match="cbam"):
        attn_fast.cbam(**inputs)


def test_se_module_plan_follows_the_module(cpu_path):
    """The SE modules look their submodules and names up once, and again after any attribute is set:
    a new activation, a new fc, a dtype change and new weights all show in the next call."""
    m = attn_fast.nn.SEModule(12, rd_channels=4).eval()
    x = rand(2, 12, 5, 3)

    def want(act="relu"):
        return reference.squeeze_excite(x.to(m.fc1.weight.dtype), m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias,
                                        activation=act)

    with torch.no_grad():
        torch.testing.assert_close(m(x), want())
        m.act = torch.nn.SiLU()
        torch.testing.assert_close(m(x), want("silu"))
        m.fc1 = torch.nn.Conv2d(12, 4, 1)
        torch.testing.assert_close(m(x), want("silu"))
        m.fc2.weight.mul_(2.0)
        torch.testing.assert_close(m(x), want("silu"))
        m.fc2.weight = torch.nn.Parameter(torch.randn(12, 4, 1, 1))
        torch.testing.assert_close(m(x), want("silu"))
        m.double()
        torch.testing.assert_close(m(x.double()), want("silu"))
