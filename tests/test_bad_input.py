"""Issue 8 (reliability), part 1: bad input to every public function and module gets a clear
exception (ValueError or TypeError) whose message names the argument, what was expected and what
came; float64 input is not bad (it runs the reference, and must equal it).

One table, CASES: each row is a name, a thunk that makes the call, and either the exception type and
a regex on its message, or ``None`` and the thunk returns (got, expected) pairs that must be equal.
Every call is rejected before a kernel runs (or runs the float64 reference), so the table is fast
under the Triton interpreter. A tensor "on another GPU" is stood in for by a ``meta`` tensor beside
CPU ones; ``test_tensors_on_two_gpus`` is the real thing and needs two CUDA devices.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Type

import pytest
import torch
from torch import nn

import attn_fast
from attn_fast import reference
from attn_fast.nn import (CBAM, EcaModule, EffectiveSEModule, EfficientNetSqueezeExcite, MultiheadAttention, SEModule,
                          SqueezeExcite, UnsupportedLayerError, VitAttention)
from numerics import rand

F64 = torch.float64
SDPA, SE, ECA, CB = "scaled_dot_product_attention", "squeeze_excite", "efficient_channel_attention", "cbam"
FLOATS = r"float16, bfloat16, float32, float64"


class Case(NamedTuple):
    name: str
    call: Callable
    exc: Optional[Type[Exception]]  # None: must run, and the call returns (got, expected) pairs
    match: str = ""


# ---------------------------------------------------------------- valid arguments, one changed per case

def sdpa(**over):
    args = dict(query=rand(2, 4, 5, 8), key=rand(2, 4, 6, 8), value=rand(2, 4, 6, 8))
    args.update(over)
    return attn_fast.scaled_dot_product_attention(**args)


def se(**over):
    args = dict(x=rand(2, 8, 3, 3), fc1_weight=rand(2, 8), fc1_bias=rand(2), fc2_weight=rand(8, 2), fc2_bias=rand(8))
    args.update(over)
    return attn_fast.squeeze_excite(**args)


def eca(**over):
    args = dict(x=rand(2, 8, 3, 3), conv_weight=rand(1, 1, 3))
    args.update(over)
    return attn_fast.efficient_channel_attention(**args)


def cb(**over):
    args = dict(x=rand(2, 8, 5, 5), fc1_weight=rand(2, 8), fc2_weight=rand(8, 2), conv_weight=rand(1, 2, 7, 7))
    args.update(over)
    return attn_fast.cbam(**args)


def bn(**over):
    """BatchNorm arguments of cbam, in eval mode."""
    args = dict(bn_weight=rand(1), bn_bias=rand(1), bn_running_mean=rand(1), bn_running_var=torch.ones(1))
    args.update(over)
    return args


def mha(*inputs, module=None, **kw):
    m = module or MultiheadAttention(8, 2, batch_first=True)
    x = rand(2, 5, 8)
    q, k, v = inputs + (x, x, x)[len(inputs):]
    return m(q, k, v, **{"need_weights": False, **kw})


def vit(x, **kw):
    """A VitAttention with the submodules of timm's ``Attention(16, num_heads=2)`` (built by hand:
    importing timm takes longer than this whole file)."""
    m = VitAttention()
    m.qkv, m.proj = nn.Linear(16, 48), nn.Linear(16, 16)
    m.q_norm, m.k_norm, m.norm = nn.Identity(), nn.Identity(), nn.Identity()
    m.attn_drop, m.proj_drop, m.gate = nn.Dropout(0.0), nn.Dropout(0.0), None
    m.num_heads, m.head_dim, m.scale = 2, 8, 8 ** -0.5
    return m(x, **kw)


def ints(*shape, dtype=torch.int64):
    return torch.ones(*shape, dtype=dtype)


def meta(t):
    return t.to("meta")


# ---------------------------------------------------------------- float64 and float64 + requires_grad

def _f64(*shape, grad=False):
    return rand(*shape, dtype=F64).requires_grad_(grad)


def _sdpa_f64():
    q, k, v = _f64(2, 4, 5, 8), _f64(2, 2, 6, 8), _f64(2, 2, 6, 12)
    mask = torch.rand(5, 6) > 0.3
    kw = dict(attn_mask=mask, is_causal=True, enable_gqa=True, scale=0.3)
    got = attn_fast.scaled_dot_product_attention(q, k, v, **kw)
    return [(got, reference.scaled_dot_product_attention(q, k, v, **kw))]


def _sdpa_f64_grad():
    q, k, v = _f64(3, 5, 8, grad=True), _f64(3, 7, 8, grad=True), _f64(3, 7, 4, grad=True)
    mask = rand(5, 7, dtype=F64)  # additive, float64 like the query
    out = attn_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    return [(out, ref), *zip(grads, ref_grads)]


def _se_f64_grad():
    x, w1, b1, w2, b2 = _f64(2, 8, 3, 3, grad=True), _f64(2, 8, 1, 1), _f64(2), _f64(8, 2), _f64(8)
    kw = dict(activation="silu", gate="hardsigmoid", pool="avgmax")
    out, ref = attn_fast.squeeze_excite(x, w1, b1, w2, b2, **kw), reference.squeeze_excite(x, w1, b1, w2, b2, **kw)
    return [(out, ref), (torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])]


def _eca_f64():
    x, w = _f64(2, 8, 3, 3).to(memory_format=torch.channels_last), _f64(5)
    return [(attn_fast.efficient_channel_attention(x, w), reference.efficient_channel_attention(x, w))]


def _cbam_f64():
    args = (_f64(2, 8, 5, 5), _f64(2, 8), _f64(8, 2), _f64(1, 2, 3, 3))
    kw = dict(bn_weight=_f64(1), bn_bias=_f64(1), bn_running_mean=_f64(1), bn_running_var=torch.ones(1, dtype=F64))
    return [(attn_fast.cbam(*args, **kw), reference.cbam(*args, **kw))]


def _modules_f64():
    x = _f64(2, 8, 3, 3)
    m = SqueezeExcite(8, 2).double()
    want = reference.squeeze_excite(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)
    torch_mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    fast_mha = MultiheadAttention.from_module(torch_mha)
    s = _f64(2, 5, 8)
    return [(m(x), want),
            (fast_mha(s, s, s, need_weights=False)[0], torch_mha(s, s, s, need_weights=False)[0])]


# ---------------------------------------------------------------- the table

CASES = [
    # ---- scaled_dot_product_attention
    Case("sdpa/query-list", lambda: sdpa(query=[1.0]), TypeError, rf"{SDPA}: query must be a torch\.Tensor, got list"),
    Case("sdpa/value-None", lambda: sdpa(value=None), TypeError, r"value must be a torch\.Tensor, got NoneType"),
    Case("sdpa/query-1D", lambda: sdpa(query=rand(8)), ValueError,
         r"query, key and value must be at least 2-D \(\.\.\., L, E\), got 1-D, 4-D and 4-D"),
    Case("sdpa/query-5D-batch-no-broadcast", lambda: sdpa(query=rand(2, 3, 4, 5, 8)), ValueError,
         r"batch dims do not broadcast: query \(2, 3\), key \(2,\), value \(2,\)"),
    Case("sdpa/int64-qkv", lambda: sdpa(query=ints(2, 4, 5, 8), key=ints(2, 4, 6, 8), value=ints(2, 4, 6, 8)),
         TypeError, rf"query must have dtype {FLOATS}, got torch\.int64"),
    Case("sdpa/bool-query", lambda: sdpa(query=ints(2, 4, 5, 8, dtype=torch.bool)), TypeError,
         r"query must have dtype .*got torch\.bool"),
    Case("sdpa/value-bf16", lambda: sdpa(value=rand(2, 4, 6, 8, dtype=torch.bfloat16)), TypeError,
         r"value has dtype torch\.bfloat16 but query has torch\.float32; they must match"),
    Case("sdpa/f64-query-f32-kv", lambda: sdpa(query=rand(2, 4, 5, 8, dtype=F64)), TypeError,
         r"key has dtype torch\.float32 but query has torch\.float64"),
    Case("sdpa/value-other-device", lambda: sdpa(value=meta(rand(2, 4, 6, 8))), ValueError,
         r"value is on meta but query is on cpu; move them to the same device"),
    Case("sdpa/batch-mismatch", lambda: sdpa(value=rand(3, 4, 6, 8), key=rand(3, 4, 6, 8)), ValueError,
         r"batch dims do not broadcast: query \(2,\), key \(3,\), value \(3,\)"),
    Case("sdpa/3D-head-size-mismatch", lambda: sdpa(query=rand(4, 5, 8), key=rand(4, 6, 16), value=rand(4, 6, 8)),
         ValueError, r"key head size 16 != query head size 8"),
    Case("sdpa/kv-heads-mismatch", lambda: sdpa(key=rand(2, 2, 6, 8)), ValueError,
         r"query has 4 heads but key has 2 and value 4: they must be equal or 1 \(broadcast\)"),
    Case("sdpa/gqa-not-divisible", lambda: sdpa(key=rand(2, 3, 6, 8), value=rand(2, 3, 6, 8), enable_gqa=True),
         ValueError, r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    Case("sdpa/gqa-3D-not-divisible",
         lambda: sdpa(query=rand(6, 5, 8), key=rand(4, 6, 8), value=rand(4, 6, 8), enable_gqa=True), ValueError,
         r"query heads \(6\) must be a multiple of key/value heads \(4\)"),
    Case("sdpa/E=257", lambda: sdpa(query=rand(1, 3, 257), key=rand(1, 4, 257), value=rand(1, 4, 8)), ValueError,
         r"query/key head size must be at most 256, got 257"),
    Case("sdpa/Ev=257", lambda: sdpa(value=rand(2, 4, 6, 257)), ValueError,
         r"value head size must be at most 256, got 257"),
    Case("sdpa/mask-int64", lambda: sdpa(attn_mask=ints(5, 6)), TypeError,
         r"attn_mask must have dtype bool, float32, got torch\.int64"),
    Case("sdpa/mask-uint8", lambda: sdpa(attn_mask=ints(5, 6, dtype=torch.uint8)), TypeError,
         r"attn_mask must have dtype bool, float32, got torch\.uint8"),
    Case("sdpa/mask-f16-query-f32", lambda: sdpa(attn_mask=rand(5, 6, dtype=torch.float16)), TypeError,
         r"attn_mask must have dtype bool, float32, got torch\.float16"),
    Case("sdpa/mask-no-broadcast", lambda: sdpa(attn_mask=ints(5, 5, dtype=torch.bool)), ValueError,
         r"attn_mask of shape \(5, 5\) does not broadcast to \(2, 4, 5, 6\)"),
    Case("sdpa/mask-batch-no-broadcast", lambda: sdpa(attn_mask=rand(3, 1, 5, 6)), ValueError,
         r"attn_mask of shape \(3, 1, 5, 6\) does not broadcast to \(2, 4, 5, 6\)"),
    Case("sdpa/mask-list", lambda: sdpa(attn_mask=[[True] * 6] * 5), TypeError,
         r"attn_mask must be a torch\.Tensor, got list"),
    Case("sdpa/mask-other-device", lambda: sdpa(attn_mask=meta(rand(5, 6))), ValueError,
         r"attn_mask is on meta but query is on cpu"),
    Case("sdpa/dropout-negative", lambda: sdpa(dropout_p=-0.1), ValueError,
         r"dropout_p must be in \[0, 1\), got -0\.1"),
    Case("sdpa/dropout-nan", lambda: sdpa(dropout_p=float("nan")), ValueError,
         r"dropout_p must be in \[0, 1\), got nan"),
    Case("sdpa/dropout-one", lambda: sdpa(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1\.0"),
    Case("sdpa/dropout-None", lambda: sdpa(dropout_p=None), TypeError,
         r"dropout_p must be a float in \[0, 1\), got NoneType"),
    Case("sdpa/scale-nan", lambda: sdpa(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    Case("sdpa/scale-inf", lambda: sdpa(scale=float("inf")), ValueError, r"scale must be finite, got inf"),
    Case("sdpa/scale-tensor", lambda: sdpa(scale=torch.tensor([0.5, 0.5])), TypeError,
         r"scale must be a float or None, got torch\.Tensor"),
    Case("sdpa/enable_gqa-str", lambda: sdpa(enable_gqa="yes"), TypeError, r"enable_gqa must be a bool, got str"),

    # ---- squeeze_excite
    Case("se/x-list", lambda: se(x=[[1.0]]), TypeError, rf"{SE}: x must be a torch\.Tensor, got list"),
    Case("se/x-3D", lambda: se(x=rand(8, 3, 3)), ValueError, r"x must be 4-D \(N, C, H, W\), got shape \(8, 3, 3\)"),
    Case("se/x-5D", lambda: se(x=rand(2, 8, 3, 3, 3)), ValueError,
         r"x must be 4-D \(N, C, H, W\), got shape \(2, 8, 3, 3, 3\)"),
    Case("se/x-int64", lambda: se(x=ints(2, 8, 3, 3)), TypeError, rf"x must have dtype {FLOATS}, got torch\.int64"),
    Case("se/x-no-channels", lambda: se(x=rand(2, 0, 3, 3)), ValueError,
         r"x must have at least one channel \(dim 1\), got shape \(2, 0, 3, 3\)"),
    Case("se/fc1-None", lambda: se(fc1_weight=None), TypeError, r"fc1_weight must be a torch\.Tensor, got NoneType"),
    Case("se/fc1-channels", lambda: se(fc1_weight=rand(2, 7, 1, 1)), ValueError,
         r"fc1_weight must have shape \(2, 8\) or \(2, 8, 1, 1\), got \(2, 7, 1, 1\)"),
    Case("se/fc1-empty", lambda: se(fc1_weight=rand(0, 8), fc1_bias=None, fc2_weight=rand(8, 0)), ValueError,
         r"fc1_weight must have at least one output channel \(dim 0\), got shape \(0, 8\)"),
    Case("se/fc1-3D", lambda: se(fc1_weight=rand(2, 8, 1)), ValueError,
         r"fc1_weight must be 2-D or 4-D, got shape \(2, 8, 1\)"),
    Case("se/fc2-shape", lambda: se(fc2_weight=rand(8, 3)), ValueError,
         r"fc2_weight must have shape \(8, 2\) or \(8, 2, 1, 1\), got \(8, 3\)"),
    Case("se/fc2-int", lambda: se(fc2_weight=ints(8, 2, dtype=torch.int32)), TypeError,
         r"fc2_weight must have dtype .*got torch\.int32"),
    Case("se/fc1_bias-list", lambda: se(fc1_bias=[0.0, 0.0]), TypeError,
         r"fc1_bias must be a torch\.Tensor or None, got list"),
    Case("se/fc1_bias-int", lambda: se(fc1_bias=ints(2)), TypeError,
         r"fc1_bias has dtype torch\.int64 but x has torch\.float32"),
    Case("se/fc2_bias-shape", lambda: se(fc2_bias=rand(7)), ValueError, r"fc2_bias must have shape \(8,\), got \(7,\)"),
    Case("se/fc1_bias-other-device", lambda: se(fc1_bias=meta(rand(2))), ValueError,
         r"fc1_bias is on meta but x is on cpu"),
    Case("se/x-f16-weights-f32", lambda: se(x=rand(2, 8, 3, 3, dtype=torch.float16)), TypeError,
         r"fc1_weight has dtype torch\.float32 but x has torch\.float16; they must match"),
    Case("se/avgmax-empty-image", lambda: se(x=rand(2, 8, 0, 3), pool="avgmax"), ValueError,
         r"x must have H \* W >= 1 .*got shape \(2, 8, 0, 3\)"),
    Case("se/activation-None", lambda: se(activation=None), ValueError,
         r"activation must be one of \(.*'relu'.*\), got None"),

    # ---- efficient_channel_attention
    Case("eca/x-3D", lambda: eca(x=rand(8, 3, 3)), ValueError,
         rf"{ECA}: x must be 4-D \(N, C, H, W\), got shape \(8, 3, 3\)"),
    Case("eca/x-5D", lambda: eca(x=rand(1, 8, 3, 3, 3)), ValueError, r"x must be 4-D .*got shape \(1, 8, 3, 3, 3\)"),
    Case("eca/conv-even-k", lambda: eca(conv_weight=rand(1, 1, 4)), ValueError,
         r"conv_weight must have shape \(1, 1, k\) or \(k,\) with k odd, got \(1, 1, 4\)"),
    Case("eca/conv-channels", lambda: eca(conv_weight=rand(1, 2, 3)), ValueError,
         r"conv_weight must have shape \(1, 1, k\) or \(k,\) with k odd, got \(1, 2, 3\)"),
    Case("eca/conv-2D", lambda: eca(conv_weight=rand(1, 3)), ValueError,
         r"conv_weight must be 1-D or 3-D, got shape \(1, 3\)"),
    Case("eca/conv-int", lambda: eca(conv_weight=ints(3, dtype=torch.int32)), TypeError,
         r"conv_weight must have dtype .*got torch\.int32"),
    Case("eca/conv-None", lambda: eca(conv_weight=None), TypeError,
         r"conv_weight must be a torch\.Tensor, got NoneType"),
    Case("eca/conv-other-device", lambda: eca(conv_weight=meta(rand(3))), ValueError,
         r"conv_weight is on meta but x is on cpu"),
    Case("eca/gate", lambda: eca(gate="relu"), ValueError,
         r"gate must be one of \('sigmoid', 'hardsigmoid'\), got 'relu'"),

    # ---- cbam
    Case("cbam/x-list", lambda: cb(x=[1.0]), TypeError, rf"{CB}: x must be a torch\.Tensor, got list"),
    Case("cbam/x-5D", lambda: cb(x=rand(1, 2, 8, 5, 5)), ValueError,
         r"x must be 4-D \(N, C, H, W\), got shape \(1, 2, 8, 5, 5\)"),
    Case("cbam/x-empty-image", lambda: cb(x=rand(2, 8, 5, 0)), ValueError,
         r"x must have H \* W >= 1 .*got shape \(2, 8, 5, 0\)"),
    Case("cbam/x-f64-weights-f32", lambda: cb(x=rand(2, 8, 5, 5, dtype=F64)), TypeError,
         r"fc1_weight has dtype torch\.float32 but x has torch\.float64"),
    Case("cbam/fc1-channels", lambda: cb(fc1_weight=rand(2, 7)), ValueError,
         r"fc1_weight must have shape \(2, 8\) or \(2, 8, 1, 1\), got \(2, 7\)"),
    Case("cbam/fc2_bias-shape", lambda: cb(fc2_bias=rand(7)), ValueError,
         r"fc2_bias must have shape \(8,\), got \(7,\)"),
    Case("cbam/conv-3D", lambda: cb(conv_weight=rand(2, 7, 7)), ValueError,
         r"conv_weight must be 4-D \(1, 2, k, k\), got shape \(2, 7, 7\)"),
    Case("cbam/conv-in-channels", lambda: cb(conv_weight=rand(1, 3, 7, 7)), ValueError,
         r"conv_weight must have shape \(1, 2, k, k\) with k odd, got \(1, 3, 7, 7\)"),
    Case("cbam/conv-out-channels", lambda: cb(conv_weight=rand(2, 2, 7, 7)), ValueError,
         r"conv_weight must have shape \(1, 2, k, k\) with k odd, got \(2, 2, 7, 7\)"),
    Case("cbam/conv-other-device", lambda: cb(conv_weight=meta(rand(1, 2, 7, 7))), ValueError,
         r"conv_weight is on meta but x is on cpu"),
    Case("cbam/conv_bias-list", lambda: cb(conv_bias=[0.0]), TypeError,
         r"conv_bias must be a torch\.Tensor or None, got list"),
    Case("cbam/bn_weight-shape", lambda: cb(**bn(bn_weight=rand(8))), ValueError,
         r"bn_weight must have shape \(1,\), got \(8,\)"),
    Case("cbam/bn_bias-list", lambda: cb(**bn(bn_bias=[0.0])), TypeError, r"bn_bias must be a torch\.Tensor, got list"),
    Case("cbam/bn_running_var-int", lambda: cb(**bn(bn_running_var=ints(1))), TypeError,
         r"bn_running_var must have dtype .*got torch\.int64"),
    Case("cbam/bn_running_mean-other-device", lambda: cb(**bn(bn_running_mean=meta(rand(1)))), ValueError,
         r"bn_running_mean is on meta but x is on cpu"),
    Case("cbam/bn_eps-negative", lambda: cb(**bn(), bn_eps=-1.0), ValueError,
         r"bn_eps must be a finite float >= 0, got -1\.0"),
    Case("cbam/bn_eps-nan", lambda: cb(**bn(), bn_eps=float("nan")), ValueError,
         r"bn_eps must be a finite float >= 0, got nan"),
    Case("cbam/bn_eps-str", lambda: cb(**bn(), bn_eps="1e-5"), TypeError, r"bn_eps must be a float, got str"),
    Case("cbam/bn_momentum-nan", lambda: cb(**bn(), bn_momentum=float("nan")), ValueError,
         r"bn_momentum must be a float in \[0, 1\].*got nan"),
    Case("cbam/channel_gate", lambda: cb(channel_gate="tanh"), ValueError, r"channel_gate must be one of .*got 'tanh'"),
    Case("cbam/bn_training-str", lambda: cb(bn_training="yes"), TypeError, r"bn_training must be a bool, got str"),

    # ---- module constructors
    Case("SqueezeExcite/channels-0", lambda: SqueezeExcite(0, 4), ValueError,
         r"SqueezeExcite: input_channels must be >= 1, got 0"),
    Case("SqueezeExcite/squeeze-negative", lambda: SqueezeExcite(8, -2), ValueError,
         r"SqueezeExcite: squeeze_channels must be >= 1, got -2"),
    Case("SqueezeExcite/channels-float", lambda: SqueezeExcite(8.0, 2), TypeError,
         r"SqueezeExcite: input_channels must be an int, got float"),
    Case("SqueezeExcite/activation-name", lambda: SqueezeExcite(8, 2, activation="swishy"), ValueError,
         r"activation must be one of \[.*'relu'.*\], got 'swishy'"),
    Case("SqueezeExcite/activation-int", lambda: SqueezeExcite(8, 2, activation=3), TypeError,
         r"activation must be a name, an nn\.Module class or an nn\.Module, got int"),
    Case("SqueezeExcite/scale_activation-relu", lambda: SqueezeExcite(8, 2, scale_activation="relu"), ValueError,
         r"scale_activation must be a sigmoid or hardsigmoid, got relu"),
    Case("SEModule/channels-0", lambda: SEModule(0), ValueError, r"SEModule: channels must be >= 1, got 0"),
    Case("SEModule/rd_channels-negative", lambda: SEModule(8, rd_channels=-2), ValueError,
         r"SEModule: rd_channels must be >= 1, got -2"),
    Case("SEModule/gate_layer-relu", lambda: SEModule(8, gate_layer="relu"), ValueError,
         r"gate_layer must be a sigmoid or hardsigmoid, got relu"),
    Case("SEModule/act_layer-tanh", lambda: SEModule(8, act_layer=nn.Tanh), UnsupportedLayerError,
         r"act_layer Tanh is not one the kernels compute"),
    Case("EffectiveSEModule/channels-negative", lambda: EffectiveSEModule(-8), ValueError,
         r"EffectiveSEModule: channels must be >= 1, got -8"),
    Case("EffectiveSEModule/gate_layer-silu", lambda: EffectiveSEModule(8, gate_layer="silu"), ValueError,
         r"gate_layer must be a sigmoid or hardsigmoid, got silu"),
    Case("EfficientNetSE/in_chs-0", lambda: EfficientNetSqueezeExcite(0), ValueError,
         r"EfficientNetSqueezeExcite: in_chs must be >= 1, got 0"),
    Case("EfficientNetSE/rd_ratio-rounds-to-0", lambda: EfficientNetSqueezeExcite(8, rd_ratio=0.01), ValueError,
         r"EfficientNetSqueezeExcite: rd_channels \(in_chs \* rd_ratio = 8 \* 0\.01, rounded\) must be >= 1, got 0"),
    Case("EcaModule/channels-0", lambda: EcaModule(channels=0), ValueError, r"EcaModule: channels must be >= 1, got 0"),
    Case("EcaModule/gamma-0", lambda: EcaModule(channels=64, gamma=0), ValueError,
         r"EcaModule: gamma must be a finite float > 0, got 0"),
    Case("EcaModule/beta-nan", lambda: EcaModule(channels=64, beta=float("nan")), ValueError,
         r"EcaModule: beta must be a finite float, got nan"),
    Case("EcaModule/gamma-str", lambda: EcaModule(channels=64, gamma="2"), TypeError,
         r"EcaModule: gamma must be a float, got str"),
    Case("EcaModule/kernel-negative", lambda: EcaModule(kernel_size=-1), ValueError,
         r"EcaModule: kernel_size must be odd and >= 1, got -1"),
    Case("EcaModule/kernel-float", lambda: EcaModule(kernel_size=3.0), TypeError,
         r"EcaModule: kernel_size must be an int, got float"),
    Case("EcaModule/gate_layer-relu", lambda: EcaModule(8, gate_layer="relu"), ValueError,
         r"gate_layer must be a sigmoid or hardsigmoid, got relu"),
    Case("CBAM/channels-0", lambda: CBAM(0), ValueError, r"CBAM: channels must be >= 1, got 0"),
    Case("CBAM/kernel-negative", lambda: CBAM(8, spatial_kernel_size=-1), ValueError,
         r"CBAM: spatial_kernel_size must be odd and >= 1, got -1"),
    Case("CBAM/rd_channels-negative", lambda: CBAM(8, rd_channels=-1), ValueError,
         r"CBAM: rd_channels must be >= 1, got -1"),
    Case("CBAM/act_layer-name", lambda: CBAM(8, act_layer="mish"), ValueError,
         r"act_layer must be one of \[.*\], got 'mish'"),
    Case("CBAM/gate_layer-relu", lambda: CBAM(8, gate_layer="relu"), ValueError,
         r"gate_layer must be a sigmoid or hardsigmoid, got relu"),
    Case("CBAM/light-str", lambda: CBAM(8, light="yes"), TypeError, r"CBAM: light must be a bool, got str"),
    Case("MHA/embed_dim-not-divisible", lambda: MultiheadAttention(10, 3), ValueError,
         r"MultiheadAttention: embed_dim must be divisible by num_heads, got embed_dim=10 and num_heads=3"),
    Case("MHA/embed_dim-0", lambda: MultiheadAttention(0, 1), ValueError,
         r"MultiheadAttention: embed_dim must be >= 1, got 0"),
    Case("MHA/num_heads-negative", lambda: MultiheadAttention(8, -2), ValueError, r"num_heads must be >= 1, got -2"),
    Case("MHA/head-size-over-256", lambda: MultiheadAttention(514, 1), ValueError,
         r"head size embed_dim // num_heads must be at most 256 .*got 514 // 1 = 514"),
    Case("MHA/dropout-negative", lambda: MultiheadAttention(8, 2, dropout=-0.1), ValueError,
         r"dropout must be in \[0, 1\), got -0\.1"),
    Case("MHA/dropout-one", lambda: MultiheadAttention(8, 2, dropout=1.0), ValueError,
         r"dropout must be in \[0, 1\), got 1\.0"),
    Case("MHA/kdim-0", lambda: MultiheadAttention(8, 2, kdim=0), ValueError, r"kdim must be >= 1, got 0"),

    # ---- module forwards
    Case("SqueezeExcite/x-3D", lambda: SqueezeExcite(8, 2)(rand(8, 3, 3)), ValueError,
         r"SqueezeExcite: x must be 4-D \(N, C, H, W\), got shape \(8, 3, 3\)"),
    Case("SEModule/x-5D", lambda: SEModule(8)(rand(1, 8, 3, 3, 3)), ValueError,
         r"SEModule: x must be 4-D .*got shape \(1, 8, 3, 3, 3\)"),
    Case("SqueezeExcite/x-channels", lambda: SqueezeExcite(8, 2)(rand(2, 7, 3, 3)), ValueError,
         r"SqueezeExcite: x must have 8 channels \(dim 1\), got shape \(2, 7, 3, 3\)"),
    Case("EffectiveSEModule/x-int", lambda: EffectiveSEModule(8)(ints(2, 8, 3, 3)), TypeError,
         r"EffectiveSEModule: x must have dtype .*got torch\.int64"),
    Case("EfficientNetSE/x-list", lambda: EfficientNetSqueezeExcite(8)([1.0]), TypeError,
         r"EfficientNetSqueezeExcite: x must be a torch\.Tensor, got list"),
    Case("SqueezeExcite/x-f16-module-f32", lambda: SqueezeExcite(8, 2)(rand(2, 8, 3, 3, dtype=torch.float16)),
         TypeError,
         r"x has dtype torch\.float16 but the module's parameters have torch\.float32"),
    Case("SEModule/x-other-device", lambda: SEModule(8)(meta(rand(2, 8, 3, 3))), ValueError,
         r"SEModule: x is on meta but the module's parameters are on cpu"),
    Case("EcaModule/x-5D", lambda: EcaModule(8)(rand(1, 8, 3, 3, 3)), ValueError,
         r"EcaModule: x must be 4-D .*got shape"),
    Case("EcaModule/x-bf16-module-f32", lambda: EcaModule(8)(rand(2, 8, 3, 3, dtype=torch.bfloat16)), TypeError,
         r"EcaModule: x has dtype torch\.bfloat16 but the module's parameters have torch\.float32"),
    Case("CBAM/x-3D", lambda: CBAM(8, rd_channels=2)(rand(8, 5, 5)), ValueError,
         r"CBAM: x must be 4-D .*got shape \(8, 5, 5\)"),
    Case("CBAM/x-channels", lambda: CBAM(8, rd_channels=2)(rand(2, 6, 5, 5)), ValueError,
         r"CBAM: x must have 8 channels \(dim 1\), got shape \(2, 6, 5, 5\)"),
    Case("CBAM/x-other-device", lambda: CBAM(8, rd_channels=2)(meta(rand(2, 8, 5, 5))), ValueError,
         r"CBAM: x is on meta but the module's parameters are on cpu"),
    Case("MHA/query-4D", lambda: mha(rand(2, 5, 8, 1), rand(2, 5, 8, 1), rand(2, 5, 8, 1)), ValueError,
         r"query, key and value must all be 3-D \(batched\) or 2-D \(unbatched\), got 4-D, 4-D, 4-D"),
    Case("MHA/need_weights-query-4D", lambda: mha(rand(2, 5, 8, 1), need_weights=True), ValueError,
         r"must all be 3-D .*got 4-D, 3-D, 3-D"),
    Case("MHA/query-int", lambda: mha(ints(2, 5, 8)), TypeError,
         r"MultiheadAttention: query must have dtype .*got torch\.int64"),
    Case("MHA/key-f16", lambda: mha(rand(2, 5, 8), rand(2, 5, 8, dtype=torch.float16)), TypeError,
         r"key has dtype torch\.float16 but query has torch\.float32"),
    Case("MHA/f64-module-f32", lambda: mha(*(rand(2, 5, 8, dtype=F64),) * 3), TypeError,
         r"query has dtype torch\.float64 but the module's parameters have torch\.float32"),
    Case("MHA/key-other-device", lambda: mha(rand(2, 5, 8), meta(rand(2, 5, 8))), ValueError,
         r"key is on meta but query is on cpu"),
    Case("MHA/all-other-device", lambda: mha(*(meta(rand(2, 5, 8)),) * 3), ValueError,
         r"query is on meta but the module's parameters are on cpu"),
    Case("MHA/attn_mask-int", lambda: mha(attn_mask=ints(5, 5)), TypeError,
         r"attn_mask must be a bool or float tensor, got torch\.int64"),
    Case("MHA/attn_mask-2D-shape", lambda: mha(attn_mask=ints(4, 5, dtype=torch.bool)), ValueError,
         r"a 2-D attn_mask must have shape \(target length, source length\) = \(5, 5\), got \(4, 5\)"),
    Case("MHA/attn_mask-3D-shape", lambda: mha(attn_mask=rand(4, 5, 6)), ValueError,
         r"a 3-D attn_mask must have shape \(batch \* num_heads, target length, source length\) = \(4, 5, 5\), "
         r"got \(4, 5, 6\)"),
    Case("MHA/attn_mask-4D", lambda: mha(attn_mask=rand(2, 2, 5, 5)), ValueError,
         r"MultiheadAttention: attn_mask must be 2-D \(target length, source length\) or 3-D .*got shape \(2, 2, 5, 5\)"),
    Case("MHA/key_padding_mask-shape", lambda: mha(key_padding_mask=ints(2, 4, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \(batch, source length\) = \(2, 5\), got \(2, 4\)"),
    Case("MHA/key_padding_mask-int", lambda: mha(key_padding_mask=ints(2, 5)), TypeError,
         r"key_padding_mask must be a bool or float tensor, got torch\.int64"),
    Case("MHA/attn_mask-other-device", lambda: mha(attn_mask=meta(rand(5, 5))), ValueError,
         r"MultiheadAttention: attn_mask is on meta but query is on cpu"),
    Case("MHA/unbatched-key_padding_mask-2D", lambda: mha(rand(5, 8), rand(5, 8), rand(5, 8),
                                                          key_padding_mask=ints(1, 5, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \(source length,\) for an unbatched query = \(5,\), got \(1, 5\)"),
    Case("MHA/unbatched-attn_mask-3D", lambda: mha(rand(5, 8), rand(5, 8), rand(5, 8), attn_mask=rand(4, 5, 5)),
         ValueError, r"a 3-D attn_mask must have shape \(num_heads, target length, source length\) = \(2, 5, 5\), "
         r"got \(4, 5, 5\)"),
    Case("MHA/need_weights-attn_mask-4D", lambda: mha(attn_mask=rand(2, 2, 5, 5), need_weights=True), ValueError,
         r"attn_mask must be 2-D .*got shape \(2, 2, 5, 5\)"),
    Case("MHA/need_weights-attn_mask-2D-shape", lambda: mha(attn_mask=rand(5, 4), need_weights=True), ValueError,
         r"a 2-D attn_mask must have shape \(target length, source length\) = \(5, 5\), got \(5, 4\)"),
    Case("MHA/need_weights-attn_mask-int", lambda: mha(attn_mask=ints(5, 5), need_weights=True), TypeError,
         r"attn_mask must be a bool or float tensor, got torch\.int64"),
    Case("MHA/need_weights-key_padding_mask-shape", lambda: mha(key_padding_mask=ints(3, 5, dtype=torch.bool),
                                                                need_weights=True), ValueError,
         r"key_padding_mask must have shape \(batch, source length\) = \(2, 5\), got \(3, 5\)"),
    Case("MHA/attn_mask-list", lambda: mha(attn_mask=[[True]]), TypeError,
         r"attn_mask must be a torch\.Tensor or None, got list"),
    Case("MHA/key_padding_mask-list", lambda: mha(key_padding_mask=[[True]]), TypeError,
         r"key_padding_mask must be a torch\.Tensor or None, got list"),
    Case("VitAttention/x-2D", lambda: vit(rand(5, 16)), ValueError,
         r"VitAttention: x must be 3-D \(B, N, C\), got shape \(5, 16\)"),
    Case("VitAttention/x-features", lambda: vit(rand(2, 5, 15)), ValueError,
         r"VitAttention: x must have 16 features \(dim 2\), got shape \(2, 5, 15\)"),
    Case("VitAttention/x-int", lambda: vit(ints(2, 5, 16)), TypeError,
         r"VitAttention: x must have dtype .*got torch\.int64"),
    Case("VitAttention/mask-no-broadcast", lambda: vit(rand(2, 5, 16), attn_mask=ints(4, 5, dtype=torch.bool)),
         ValueError,
         r"attn_mask of shape \(4, 5\) does not broadcast to \(2, 2, 5, 5\)"),

    # ---- convert / verify
    Case("convert/model-list", lambda: attn_fast.convert([nn.Linear(2, 2)]), TypeError,
         r"convert: model must be an nn\.Module, got list"),
    Case("verify/original-list", lambda: attn_fast.verify([1], nn.Linear(2, 2), rand(2, 2)), TypeError,
         r"verify: original must be an nn\.Module, got list"),
    Case("verify/dtype-int", lambda: attn_fast.verify(nn.Linear(2, 2), nn.Linear(2, 2), rand(2, 2), dtype=torch.int32),
         TypeError, r"verify: dtype must be a floating torch\.dtype .*got torch\.int32"),

    # ---- float64 is not bad input: it runs the reference and equals it (gradients too)
    Case("f64/sdpa-gqa-mask-causal", _sdpa_f64, None),
    Case("f64/sdpa-requires-grad-3D", _sdpa_f64_grad, None),
    Case("f64/se-requires-grad-avgmax", _se_f64_grad, None),
    Case("f64/eca-channels-last", _eca_f64, None),
    Case("f64/cbam-batchnorm", _cbam_f64, None),
    Case("f64/modules", _modules_f64, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case):
    if case.exc is None:
        for got, want in case.call():
            assert got.dtype == want.dtype == F64
            torch.testing.assert_close(got, want)
        return
    with pytest.raises(case.exc, match=case.match) as info:
        case.call()
    assert isinstance(info.value, (TypeError, ValueError))  # never a bare RuntimeError, AssertionError...


def test_the_table_is_large_and_names_are_unique():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_two_gpus():
    """The real case behind the meta-device rows: a tensor on another GPU than the others."""
    a, b = torch.device("cuda:0"), torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"key is on cuda:1 but query is on cuda:0"):
        sdpa(query=rand(2, 4, 5, 8, device=a), key=rand(2, 4, 6, 8, device=b), value=rand(2, 4, 6, 8, device=a))
    with pytest.raises(ValueError, match=r"fc2_weight is on cuda:1 but x is on cuda:0"):
        attn_fast.squeeze_excite(rand(2, 8, 3, 3, device=a), rand(2, 8, device=a), fc2_weight=rand(8, 2, device=b))
    with pytest.raises(ValueError, match=r"conv_weight is on cuda:1 but x is on cuda:0"):
        attn_fast.efficient_channel_attention(rand(2, 8, 3, 3, device=a), rand(3, device=b))
    with pytest.raises(ValueError, match=r"bn_running_var is on cuda:1 but x is on cuda:0"):
        cb(**{k: v.to(a) for k, v in dict(x=rand(2, 8, 5, 5), fc1_weight=rand(2, 8), fc2_weight=rand(8, 2),
                                         conv_weight=rand(1, 2, 7, 7)).items()},
           bn_running_mean=rand(1, device=a), bn_running_var=torch.ones(1, device=b))
    with pytest.raises(ValueError, match=r"SEModule: x is on cuda:1 but the module's parameters are on cuda:0"):
        SEModule(8).to(a)(rand(2, 8, 3, 3, device=b))
    with pytest.raises(ValueError, match=r"MultiheadAttention: query is on cuda:1 but the module's parameters are on "
                                         r"cuda:0"):
        x = rand(2, 5, 8, device=b)
        MultiheadAttention(8, 2, batch_first=True).to(a)(x, x, x, need_weights=False)
