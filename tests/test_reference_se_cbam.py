"""The SE / ECA / CBAM references against the real modules they mirror, in float64.

``reference.squeeze_excite`` and ``reference.efficient_channel_attention`` are checked against
torchvision's ``SqueezeExcitation`` and timm's ``SEModule``, ``EffectiveSEModule``, EfficientNet
``SqueezeExcite`` and ``EcaModule``; ``reference.cbam`` against timm's ``CbamModule`` /
``LightCbamModule`` and against a re-implementation of the paper's module (Woo et al. 2018, official
code Jongchan/attention-module). Every check compares the output, the gradient w.r.t. the input and
w.r.t. every parameter of the module, and (BatchNorm in training mode) the running statistics.

Method: the module runs as built, the reference on a deep copy of it (fed the copy's own parameter
and buffer tensors), so gradients are compared parameter by parameter by name, and in-place updates
of the running statistics cannot leak from one side to the other. BatchNorm parameters and running
statistics are randomised first (a fresh BatchNorm is the identity map in eval mode).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attn_fast import reference

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64

#: (N, C, H, W): C not a multiple of 8, odd and degenerate spatial sizes, batch 1 and 3.
SHAPES = [(3, 20, 5, 7), (1, 36, 3, 11), (3, 36, 1, 1), (1, 20, 5, 7)]
#: Shapes usable with BatchNorm in training mode (more than one value per normalised channel).
TRAIN_SHAPES = [(3, 20, 5, 7), (3, 36, 3, 11), (3, 36, 1, 1)]
#: Shapes for a BatchNorm over the spatial map (statistics over N*H*W) in training mode.
SPATIAL_TRAIN_SHAPES = [(3, 20, 5, 7), (1, 36, 3, 11), (3, 36, 1, 1)]


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


def _with_shapes(cases, shapes=SHAPES, per_case: int = 2):
    """Each case with ``per_case`` of ``shapes``, rotating so that neighbouring cases (and every
    case family) see all the shapes, without the full cartesian product (keeps the file fast)."""
    out = []
    for i, case in enumerate(cases):
        case = case if isinstance(case, tuple) else (case,)
        for j in range(per_case):
            shape = shapes[(i + i // 2 + j * len(shapes) // per_case) % len(shapes)]
            out.append(pytest.param(*case, shape, id="-".join(map(str, case)) + "-" + _shape_id(shape)))
    return out


def _timm():
    return pytest.importorskip(
        "timm", reason="timm is not installed: its SE/ECA/CBAM modules are the ground truth here")


def _torchvision():
    return pytest.importorskip(
        "torchvision", reason="torchvision is not installed: ops.SqueezeExcitation is the ground truth here")


def _randomize_norms(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics for every BatchNorm in ``module`` (a
    fresh one has weight 1, bias 0, mean 0, var 1, which would hide a mix-up)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1.0 + 0.5 * torch.randn_like(m.weight))
                m.bias.copy_(0.5 * torch.randn_like(m.bias))
                m.running_mean.copy_(0.5 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    return module


def _prepare(module: nn.Module, train: bool = False) -> nn.Module:
    module = _randomize_norms(module.double())
    return module.train(train)


def check_against_module(
    module: nn.Module,
    ref: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    x_ref: Optional[torch.Tensor] = None,
) -> None:
    """Output, gradients (input and every parameter) and buffers after the call of
    ``module(x)`` against ``ref(copy_of_module, x_ref)`` (``x_ref`` defaults to ``x``; a
    channels_last ``x_ref`` must also give a channels_last output)."""
    assert x.dtype == DT and (x != 0).all()
    mod = module
    twin = copy.deepcopy(module)
    xa = x.detach().clone().requires_grad_(True)
    xb = (x if x_ref is None else x_ref).detach().clone().requires_grad_(True)

    ya = mod(xa)
    yb = ref(twin, xb)
    assert yb.shape == ya.shape and yb.dtype == ya.dtype
    if xb.dim() == 4 and not xb.is_contiguous() and xb.is_contiguous(memory_format=torch.channels_last):
        assert yb.is_contiguous(memory_format=torch.channels_last), "channels_last input, output not"
    torch.testing.assert_close(yb, ya, **TOL)

    pa: Dict[str, torch.Tensor] = dict(mod.named_parameters())
    pb: Dict[str, torch.Tensor] = dict(twin.named_parameters())
    assert pa.keys() == pb.keys() and len(pa) > 0
    names = list(pa)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa] + [pa[n] for n in names], g, allow_unused=True)
    gb = torch.autograd.grad(yb, [xb] + [pb[n] for n in names], g, allow_unused=True)
    for name, a, b in zip(["x"] + names, ga, gb):
        assert a is not None, f"the module does not use {name}"
        assert b is not None, f"the reference does not use {name}"
        torch.testing.assert_close(b, a, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")

    ba = dict(mod.named_buffers())
    bb = dict(twin.named_buffers())
    for name, a in ba.items():
        if name.endswith("num_batches_tracked"):
            continue  # counts calls; the functional reference has no such counter
        torch.testing.assert_close(bb[name], a, **TOL, msg=lambda m, name=name: f"buffer {name}: {m}")


def _bn_kwargs(bn: nn.Module) -> dict:
    """The ``bn_*`` arguments of ``reference.cbam`` from a BatchNorm module, in its current mode."""
    return dict(bn_weight=bn.weight, bn_bias=bn.bias, bn_running_mean=bn.running_mean,
                bn_running_var=bn.running_var, bn_training=bn.training, bn_momentum=bn.momentum,
                bn_eps=bn.eps)


def _x(shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT)


# ---------------------------------------------------------------------------------------------
# torchvision.ops.SqueezeExcitation
# ---------------------------------------------------------------------------------------------

TV_ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU}
TV_GATES = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


def _tv_ref(activation: str, gate: str):
    def ref(m, x):
        return reference.squeeze_excite(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias,
                                        activation=activation, gate=gate)
    return ref


@pytest.mark.parametrize("activation, gate, shape",
                         _with_shapes([(a, g) for a in sorted(TV_ACTS) for g in sorted(TV_GATES)]))
def test_torchvision_squeeze_excitation(activation, gate, shape):
    tv = _torchvision()
    module = _prepare(tv.ops.SqueezeExcitation(shape[1], 5, activation=TV_ACTS[activation],
                                               scale_activation=TV_GATES[gate]))
    check_against_module(module, _tv_ref(activation, gate), _x(shape))


@pytest.mark.parametrize("shape", [(3, 20, 5, 7), (1, 36, 3, 11)], ids=_shape_id)
def test_torchvision_squeeze_excitation_channels_last(shape):
    tv = _torchvision()
    module = _prepare(tv.ops.SqueezeExcitation(shape[1], 6, activation=nn.SiLU,
                                               scale_activation=nn.Hardsigmoid))
    x = _x(shape)
    # the reference on channels_last input gives the module's NCHW values, and keeps the format
    x_cl = x.to(memory_format=torch.channels_last)
    check_against_module(module, _tv_ref("silu", "hardsigmoid"), x, x_ref=x_cl)


# ---------------------------------------------------------------------------------------------
# timm SEModule, EffectiveSEModule, EfficientNet SqueezeExcite
# ---------------------------------------------------------------------------------------------

#: name -> (SEModule kwargs, reference kwargs)
SE_CASES = {
    "default": ({}, {}),
    "add_maxpool": (dict(add_maxpool=True), dict(pool="avgmax")),
    "no_bias": (dict(bias=False), {}),
    "silu": (dict(act_layer=nn.SiLU), dict(activation="silu")),
    "hard_sigmoid_gate": (dict(gate_layer="hard_sigmoid"), dict(gate="hardsigmoid")),
    "bn_eval": (dict(norm_layer=nn.BatchNorm2d), {}),
    "maxpool_silu_hardsigmoid": (dict(add_maxpool=True, act_layer=nn.SiLU, gate_layer="hard_sigmoid"),
                                 dict(pool="avgmax", activation="silu", gate="hardsigmoid")),
}


def _se_ref(ref_kwargs: dict):
    def ref(m, x):
        norm = m.bn if isinstance(m.bn, nn.modules.batchnorm._BatchNorm) else None
        return reference.squeeze_excite(x, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias,
                                        norm=norm, **ref_kwargs)
    return ref


@pytest.mark.parametrize("case, shape", _with_shapes(sorted(SE_CASES)))
def test_timm_se_module(case, shape):
    timm = _timm()
    mod_kwargs, ref_kwargs = SE_CASES[case]
    module = _prepare(timm.layers.SEModule(shape[1], **mod_kwargs))
    if case == "no_bias":
        assert module.fc1.bias is None and module.fc2.bias is None
    check_against_module(module, _se_ref(ref_kwargs), _x(shape))


@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_timm_se_module_batchnorm_train(act, shape):
    """norm_layer=BatchNorm2d in training mode: batch statistics over N, running stats updated."""
    timm = _timm()
    module = _prepare(timm.layers.SEModule(shape[1], norm_layer=nn.BatchNorm2d,
                                           act_layer=nn.SiLU if act == "silu" else nn.ReLU), train=True)
    before = module.bn.running_mean.clone()
    check_against_module(module, _se_ref(dict(activation=act)), _x(shape))
    assert not torch.equal(module.bn.running_mean, before)  # the update did happen


@pytest.mark.parametrize("shape", [(3, 20, 5, 7), (1, 36, 3, 11)], ids=_shape_id)
@pytest.mark.parametrize("case", ["default", "maxpool_silu_hardsigmoid", "bn_eval"])
def test_timm_se_module_channels_last(case, shape):
    timm = _timm()
    mod_kwargs, ref_kwargs = SE_CASES[case]
    module = _prepare(timm.layers.SEModule(shape[1], **mod_kwargs))
    x = _x(shape)
    check_against_module(module, _se_ref(ref_kwargs), x, x_ref=x.to(memory_format=torch.channels_last))


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("add_maxpool", [False, True])
def test_timm_effective_se(add_maxpool, shape):
    timm = _timm()
    module = _prepare(timm.layers.EffectiveSEModule(shape[1], add_maxpool=add_maxpool))

    def ref(m, x):
        return reference.squeeze_excite(x, m.fc.weight, m.fc.bias, None, gate="hardsigmoid",
                                        pool="avgmax" if add_maxpool else "avg")
    check_against_module(module, ref, _x(shape))


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_timm_efficientnet_squeeze_excite(act, shape):
    _timm()
    from timm.models._efficientnet_blocks import SqueezeExcite

    module = _prepare(SqueezeExcite(shape[1], rd_ratio=0.25, act_layer=nn.SiLU if act == "silu" else nn.ReLU))

    def ref(m, x):
        return reference.squeeze_excite(x, m.conv_reduce.weight, m.conv_reduce.bias,
                                        m.conv_expand.weight, m.conv_expand.bias, activation=act)
    check_against_module(module, ref, _x(shape))


# ---------------------------------------------------------------------------------------------
# timm EcaModule
# ---------------------------------------------------------------------------------------------

def _eca_ref(m, x):
    return reference.efficient_channel_attention(x, m.conv.weight)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_timm_eca(kernel_size, shape):
    timm = _timm()
    module = _prepare(timm.layers.EcaModule(kernel_size=kernel_size))
    assert module.conv.weight.shape == (1, 1, kernel_size)
    check_against_module(module, _eca_ref, _x(shape))


@pytest.mark.parametrize("channels, kernel_size", [(20, 3), (36, 3), (256, 5), (2048, 7)])
def test_timm_eca_auto_kernel(channels, kernel_size):
    timm = _timm()
    module = _prepare(timm.layers.EcaModule(channels=channels))
    assert module.conv.weight.shape == (1, 1, kernel_size)
    check_against_module(module, _eca_ref, _x((3, channels, 3, 5)))


def test_timm_eca_channels_last():
    timm = _timm()
    module = _prepare(timm.layers.EcaModule(kernel_size=5))
    x = _x((3, 20, 5, 7))
    check_against_module(module, _eca_ref, x, x_ref=x.to(memory_format=torch.channels_last))


# ---------------------------------------------------------------------------------------------
# timm CbamModule / LightCbamModule
# ---------------------------------------------------------------------------------------------

#: name -> (module kwargs, reference kwargs)
CBAM_CASES = {
    "default": ({}, {}),
    "silu": (dict(act_layer=nn.SiLU), dict(activation="silu")),
    "mlp_bias": (dict(mlp_bias=True), {}),
    "spatial_k3": (dict(spatial_kernel_size=3), {}),
    "spatial_k7": (dict(spatial_kernel_size=7), {}),
    "hard_sigmoid_gate": (dict(gate_layer="hard_sigmoid"), dict(gate="hardsigmoid")),
    "mixed": (dict(act_layer=nn.SiLU, mlp_bias=True, spatial_kernel_size=5), dict(activation="silu")),
}
#: LightCbamModule: the channel gate is always F.sigmoid and its spatial gate is built without
#: gate_layer, so gate_layer="hard_sigmoid" changes nothing: the reference keeps gate="sigmoid".
LIGHT_CBAM_CASES = {
    "default": ({}, {}),
    "silu": (dict(act_layer=nn.SiLU), dict(activation="silu")),
    "mlp_bias": (dict(mlp_bias=True), {}),
    "spatial_k3": (dict(spatial_kernel_size=3), {}),
    "spatial_k7": (dict(spatial_kernel_size=7), {}),
    "hard_sigmoid_gate_ignored": (dict(gate_layer="hard_sigmoid"), {}),
}


def _timm_cbam(light: bool, channels: int, train: bool, **kwargs) -> nn.Module:
    _timm()
    from timm.layers.cbam import CbamModule, LightCbamModule

    cls = LightCbamModule if light else CbamModule
    return _prepare(cls(channels, **kwargs), train=train)


def _timm_cbam_ref(light: bool, ref_kwargs: dict):
    def ref(m, x):
        ch, sp = m.channel, m.spatial
        # ConvNormAct: .conv is the Conv2d (no bias), .bn a BatchNormAct2d with an Identity act
        assert isinstance(sp.conv.bn.act, nn.Identity)
        return reference.cbam(x, ch.fc1.weight, ch.fc2.weight, sp.conv.conv.weight,
                              ch.fc1.bias, ch.fc2.bias, sp.conv.conv.bias, light=light,
                              **_bn_kwargs(sp.conv.bn), **ref_kwargs)
    return ref


#: ("cbam" | "light", case name)
CBAM_NAMES = [("cbam", n) for n in sorted(CBAM_CASES)] + [("light", n) for n in sorted(LIGHT_CBAM_CASES)]


def _cbam_case(kind: str, name: str):
    light = kind == "light"
    mod_kwargs, ref_kwargs = (LIGHT_CBAM_CASES if light else CBAM_CASES)[name]
    return light, mod_kwargs, ref_kwargs


@pytest.mark.parametrize("kind, name, shape", _with_shapes(CBAM_NAMES))
def test_timm_cbam_eval(kind, name, shape):
    light, mod_kwargs, ref_kwargs = _cbam_case(kind, name)
    module = _timm_cbam(light, shape[1], train=False, **mod_kwargs)
    check_against_module(module, _timm_cbam_ref(light, ref_kwargs), _x(shape))


@pytest.mark.parametrize("kind, name, shape", _with_shapes(CBAM_NAMES, SPATIAL_TRAIN_SHAPES, per_case=1))
def test_timm_cbam_train(kind, name, shape):
    light, mod_kwargs, ref_kwargs = _cbam_case(kind, name)
    module = _timm_cbam(light, shape[1], train=True, **mod_kwargs)
    assert module.spatial.conv.bn.momentum == 0.1
    before = module.spatial.conv.bn.running_var.clone()
    check_against_module(module, _timm_cbam_ref(light, ref_kwargs), _x(shape))
    assert not torch.equal(module.spatial.conv.bn.running_var, before)  # the update did happen


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("shape", [(3, 20, 5, 7), (1, 36, 3, 11)], ids=_shape_id)
@pytest.mark.parametrize("light", [False, True], ids=["cbam", "light"])
def test_timm_cbam_channels_last(light, shape, train):
    module = _timm_cbam(light, shape[1], train=train, act_layer=nn.SiLU, mlp_bias=True)
    x = _x(shape)
    x_cl = x.to(memory_format=torch.channels_last)
    check_against_module(module, _timm_cbam_ref(light, dict(activation="silu")), x, x_ref=x_cl)


def test_timm_cbam_custom_momentum():
    """bn_momentum follows the module's BatchNorm (not a hard-coded 0.1)."""
    module = _timm_cbam(False, 20, train=True)
    module.spatial.conv.bn.momentum = 0.3
    check_against_module(module, _timm_cbam_ref(False, {}), _x((3, 20, 5, 7)))


# ---------------------------------------------------------------------------------------------
# The paper's CBAM (Woo et al. 2018), re-implemented after the official code's structure
# ---------------------------------------------------------------------------------------------

class PaperChannelGate(nn.Module):
    """Shared MLP (Flatten, Linear C->C/r, ReLU, Linear C/r->C, with biases) on the global average
    pool and the global max pool; the two logits are summed, then a sigmoid scales x."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, channels // reduction), nn.ReLU(),
                                 nn.Linear(channels // reduction, channels))

    def forward(self, x):
        size = (x.size(2), x.size(3))
        avg = self.mlp(F.avg_pool2d(x, size, stride=size))
        mx = self.mlp(F.max_pool2d(x, size, stride=size))
        return x * torch.sigmoid(avg + mx)[:, :, None, None].expand_as(x)


class PaperSpatialGate(nn.Module):
    """ChannelPool ([max over C, mean over C], in that order), a 7x7 conv without bias followed by
    BatchNorm2d(eps=1e-5, momentum=0.01, affine), no ReLU, and a sigmoid scaling x."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        pooled = torch.cat([torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class PaperCBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channel_gate = PaperChannelGate(channels, reduction)
        self.spatial_gate = PaperSpatialGate()

    def forward(self, x):
        return self.spatial_gate(self.channel_gate(x))


def _paper_ref(m, x):
    mlp, sp = m.channel_gate.mlp, m.spatial_gate
    return reference.cbam(x, mlp[1].weight, mlp[3].weight, sp.conv.weight, fc1_bias=mlp[1].bias,
                          fc2_bias=mlp[3].bias, spatial_order="max_mean", bn_weight=sp.bn.weight,
                          bn_bias=sp.bn.bias, bn_running_mean=sp.bn.running_mean,
                          bn_running_var=sp.bn.running_var, bn_training=sp.bn.training,
                          bn_momentum=0.01, bn_eps=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_paper_cbam_eval(shape):
    module = _prepare(PaperCBAM(shape[1]), train=False)
    check_against_module(module, _paper_ref, _x(shape))


@pytest.mark.parametrize("shape", SPATIAL_TRAIN_SHAPES, ids=_shape_id)
def test_paper_cbam_train(shape):
    module = _prepare(PaperCBAM(shape[1]), train=True)
    before = module.spatial_gate.bn.running_mean.clone()
    check_against_module(module, _paper_ref, _x(shape))
    assert not torch.equal(module.spatial_gate.bn.running_mean, before)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_paper_cbam_channels_last(train):
    module = _prepare(PaperCBAM(36), train=train)
    x = _x((3, 36, 5, 7))
    check_against_module(module, _paper_ref, x, x_ref=x.to(memory_format=torch.channels_last))


def test_paper_cbam_order_matters():
    """The paper stacks [max_c, mean_c]; timm stacks [mean_c, max_c]: with the same weights the two
    orders disagree, so the ``spatial_order`` switch is actually exercised above."""
    module = _prepare(PaperCBAM(20), train=False)
    x = _x((3, 20, 5, 7))
    mlp, sp = module.channel_gate.mlp, module.spatial_gate
    kw = dict(fc1_bias=mlp[1].bias, fc2_bias=mlp[3].bias, bn_weight=sp.bn.weight, bn_bias=sp.bn.bias,
              bn_running_mean=sp.bn.running_mean, bn_running_var=sp.bn.running_var)
    with torch.no_grad():
        a = reference.cbam(x, mlp[1].weight, mlp[3].weight, sp.conv.weight, spatial_order="max_mean", **kw)
        b = reference.cbam(x, mlp[1].weight, mlp[3].weight, sp.conv.weight, spatial_order="mean_max", **kw)
        torch.testing.assert_close(a, module(x), **TOL)
    assert (a - b).abs().max() > 1e-3


def test_eca_rejects_an_even_kernel():
    x = torch.randn(1, 8, 2, 2, dtype=DT)
    with pytest.raises(ValueError, match="kernel size must be odd"):
        reference.efficient_channel_attention(x, torch.randn(1, 1, 4, dtype=DT))
