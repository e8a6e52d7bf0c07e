"""Drop-in squeeze-and-excitation modules, one per layout of parameters in the wild, each running
the fused op (``attn_fast.squeeze_excite`` / ``attn_fast.efficient_channel_attention``).

Each has the constructor arguments and the submodule names of the layer it replaces, so its
state_dict has the same keys and shapes, and a ``from_module(m)`` that builds it around ``m``'s own
submodules: the parameters are shared (the same ``nn.Parameter`` objects), so an optimizer or a
checkpoint made for the original keeps working.

=============================  ==============================================  ===========================
attn_fast.nn                   replaces                                        parameters
=============================  ==============================================  ===========================
``SqueezeExcite``              torchvision ``ops.SqueezeExcitation``           fc1, fc2
``SEModule``                   timm ``layers.SEModule``                        fc1, bn (optional), fc2
``EffectiveSEModule``          timm ``layers.EffectiveSEModule``               fc
``EfficientNetSqueezeExcite``  timm ``models._efficientnet_blocks.SqueezeExcite``  conv_reduce, conv_expand
``EcaModule``                  timm ``layers.EcaModule``                       conv
=============================  ==============================================  ===========================
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch.fx
from torch import Tensor, nn

from .. import functional
from .._validate import InputError, check_finite_float, check_positive_int
from ._layers import (ActivationSpec, UnsupportedLayerError, activation_name, autocast_enabled, autocast_off,
                      cast_for_autocast,
                      check_input, check_pointwise_conv, gate_name, make_activation, make_divisible)

__all__ = ["SqueezeExcite", "SEModule", "EffectiveSEModule", "EfficientNetSqueezeExcite", "EcaModule"]


def _original_forward(m: nn.Module, module_path: str, qualname: str) -> None:
    """``m`` is the class named (or a subclass that keeps its forward): anything else may compute
    something else, so it is not converted."""
    for cls in type(m).__mro__:
        if cls.__module__ == module_path and cls.__qualname__ == qualname:
            if type(m).forward is not cls.forward:
                raise UnsupportedLayerError(f"{type(m).__qualname__} overrides {qualname}.forward")
            return
    raise UnsupportedLayerError(f"expected a {module_path}.{qualname}, got {type(m).__qualname__}")


def _squeeze_excite(owner: str, x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                    fc2_weight: Optional[Tensor], fc2_bias: Optional[Tensor], norm: Optional[nn.Module],
                    activation: str, gate: str, pool: str) -> Tensor:
    """The SE modules' forward once the submodules are picked: the input checks, the autocast casts and
    the fused op. A module-level function so that torch.fx records it as one call (``torch.fx.wrap``
    below): symbolic tracing sees Proxies, not tensors, and the checks run when the graph runs."""
    if (type(x) is Tensor and x.dim() == 4 and x.dtype == fc1_weight.dtype and x.device == fc1_weight.device
            and x.shape[1] == fc1_weight.shape[1] and not autocast_enabled(x)):
        # the common call (a per-call cost on small maps): nothing to cast, no autocast to turn off;
        # the op checks the rest
        return functional.squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation=activation,
                                         gate=gate, pool=pool, norm=norm)
    check_input(owner, "x", x, fc1_weight, ndims=(4,), legend="(N, C, H, W)", channels=fc1_weight.shape[1])
    weights = [cast_for_autocast(w, x) for w in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
    with autocast_off(x):
        return functional.squeeze_excite(x, *weights, activation=activation, gate=gate, pool=pool, norm=norm)


def _efficient_channel_attention(x: Tensor, conv_weight: Tensor, gate: str) -> Tensor:
    """EcaModule's forward (one torch.fx call, as ``_squeeze_excite``)."""
    if (type(x) is Tensor and x.dim() == 4 and x.dtype == conv_weight.dtype and x.device == conv_weight.device
            and not autocast_enabled(x)):  # the common call, as in _squeeze_excite
        return functional.efficient_channel_attention(x, conv_weight, gate=gate)
    check_input("EcaModule", "x", x, conv_weight, ndims=(4,), legend="(N, C, H, W)")
    conv_weight = cast_for_autocast(conv_weight, x)
    with autocast_off(x):
        return functional.efficient_channel_attention(x, conv_weight, gate=gate)


torch.fx.wrap("_squeeze_excite")
torch.fx.wrap("_efficient_channel_attention")


def _adopt(cls, m: nn.Module, **children: nn.Module):
    """A ``cls`` holding ``children`` (``m``'s own submodules) and ``m``'s training flag."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in children.items():
        setattr(new, name, child)
    new.train(m.training)
    return new


def _param(m: nn.Module, name: str) -> Optional[Tensor]:
    """``m.<name>``: its registered parameter by a dict lookup (nn.Module's attribute lookup is the
    slow path), else the attribute (a parametrization's property, a buffer, a plain tensor)."""
    found = m._parameters.get(name, _MISSING)
    return getattr(m, name, None) if found is _MISSING else found


_MISSING = object()


class _SqueezeExciteBase(nn.Module):
    """Shared forward: subclasses say where fc1/fc2 (and the norm) are and which activation, gate
    and pooling they use."""

    pool: str = "avg"

    def _fcs(self):
        raise NotImplementedError

    def _names(self):
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # the submodules and names, looked up once (nn.Module attribute access costs ~0.4 us a name,
        # a per-call cost on small maps) and again after any attribute of this module is set
        plan = None if torch.compiler.is_compiling() else self.__dict__.get("_plan")
        if plan is None:
            plan = (*self._fcs(), *self._names())
            if not torch.compiler.is_compiling():
                self.__dict__["_plan"] = plan
        fc1, fc2, norm, act, gate = plan
        # the parameters are read on every call (.to(), load_state_dict, a new Parameter replace them)
        return _squeeze_excite(type(self).__name__, x, _param(fc1, "weight"), _param(fc1, "bias"),
                               None if fc2 is None else _param(fc2, "weight"),
                               None if fc2 is None else _param(fc2, "bias"), norm, act, gate, self.pool)

    def __setattr__(self, name: str, value) -> None:
        self.__dict__.pop("_plan", None)  # a submodule or an option may change: look them up again
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self.__dict__.pop("_plan", None)
        super().__delattr__(name)

    def extra_repr(self) -> str:
        act, gate = self._names()
        return f"activation={act}, gate={gate}, pool={self.pool}"


class SqueezeExcite(_SqueezeExciteBase):
    r"""torchvision's ``SqueezeExcitation`` (MobileNetV3, EfficientNet, RegNet), fused:
    y = x * scale_activation(fc2(activation(fc1(mean_hw(x))))).

    Args:
        input_channels (int): C.
        squeeze_channels (int): the hidden width.
        activation, scale_activation: a module class (torchvision's way), a module, or a name
            (relu, relu6, silu, gelu, gelu_tanh, hardswish, identity; sigmoid or hardsigmoid).
    """

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: ActivationSpec = nn.ReLU, scale_activation: ActivationSpec = nn.Sigmoid,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("SqueezeExcite", "input_channels", input_channels)
        check_positive_int("SqueezeExcite", "squeeze_channels", squeeze_channels)
        dd = dict(device=device, dtype=dtype)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # no state; kept for the original's attribute set
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1, **dd)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1, **dd)
        self.activation = make_activation(activation, "activation")
        self.scale_activation = make_activation(scale_activation, "scale_activation")
        self._check_gate()

    def _check_gate(self) -> None:
        gate_name(self.scale_activation, "scale_activation")

    def _fcs(self):
        return self.fc1, self.fc2, None

    def _names(self):
        return activation_name(self.activation), activation_name(self.scale_activation)

    @classmethod
    def from_module(cls, m: nn.Module) -> "SqueezeExcite":
        """Wrap a torchvision ``SqueezeExcitation``, sharing its parameters."""
        _original_forward(m, "torchvision.ops.misc", "SqueezeExcitation")
        check_pointwise_conv(m.fc1, "fc1")
        check_pointwise_conv(m.fc2, "fc2", m.fc1.out_channels, m.fc1.in_channels)
        new = _adopt(cls, m, avgpool=m.avgpool, fc1=m.fc1, fc2=m.fc2, activation=m.activation,
                     scale_activation=m.scale_activation)
        new._names()
        new._check_gate()
        return new


class SEModule(_SqueezeExciteBase):
    r"""timm's ``SEModule`` (SE-ResNet, SE-ResNeXt, RegNetY, ...), fused:
    y = x * gate(fc2(act(bn(fc1(pool(x)))))), pool the mean, or 0.5 * mean + 0.5 * max with
    ``add_maxpool``. The arguments are timm's.

    ``norm_layer`` (``bn``): a BatchNorm in eval mode is folded into fc1 and everything is fused;
    any other norm (BatchNorm in training mode included) runs in PyTorch between the pooling and the
    scaling kernels (the backward then makes one more pass over x).
    """

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 8, add_maxpool: bool = False, bias: bool = True,
                 act_layer: ActivationSpec = nn.ReLU, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 gate_layer: ActivationSpec = "sigmoid", device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("SEModule", "channels", channels)
        dd = dict(device=device, dtype=dtype)
        self.add_maxpool = add_maxpool
        if not rd_channels:
            check_positive_int("SEModule", "rd_divisor", rd_divisor)
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        check_positive_int("SEModule", "rd_channels", rd_channels)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.bn = norm_layer(rd_channels, **dd) if norm_layer else nn.Identity()
        self.act = make_activation(act_layer, "act_layer")
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self.gate = make_activation(gate_layer, "gate_layer")
        gate_name(self.gate, "gate_layer")
        self._names()

    @property
    def pool(self) -> str:  # type: ignore[override]
        return "avgmax" if self.add_maxpool else "avg"

    def _fcs(self):
        return self.fc1, self.fc2, None if type(self.bn) is nn.Identity else self.bn

    def _names(self):
        gate = gate_name(self.gate)
        return activation_name(self.act, "act"), gate

    @classmethod
    def from_module(cls, m: nn.Module) -> "SEModule":
        """Wrap a timm ``SEModule``, sharing its parameters (and its norm layer)."""
        _original_forward(m, "timm.layers.squeeze_excite", "SEModule")
        check_pointwise_conv(m.fc1, "fc1")
        check_pointwise_conv(m.fc2, "fc2", m.fc1.out_channels, m.fc1.in_channels)
        new = _adopt(cls, m, fc1=m.fc1, bn=m.bn, act=m.act, fc2=m.fc2, gate=m.gate)
        new.add_maxpool = bool(m.add_maxpool)
        new._names()
        return new


class EffectiveSEModule(_SqueezeExciteBase):
    r"""timm's ``EffectiveSEModule`` (VoVNet / CenterMask: one (C, C) fc, hard-sigmoid gate), fused:
    y = x * gate(fc(pool(x)))."""

    def __init__(self, channels: int, add_maxpool: bool = False, gate_layer: ActivationSpec = "hard_sigmoid",
                 device=None, dtype=None, **_) -> None:
        super().__init__()
        check_positive_int("EffectiveSEModule", "channels", channels)
        self.add_maxpool = add_maxpool
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, padding=0, device=device, dtype=dtype)
        self.gate = make_activation(gate_layer, "gate_layer")
        gate_name(self.gate, "gate_layer")
        self._names()

    @property
    def pool(self) -> str:  # type: ignore[override]
        return "avgmax" if self.add_maxpool else "avg"

    def _fcs(self):
        return self.fc, None, None

    def _names(self):
        gate = gate_name(self.gate)
        return "identity", gate

    def extra_repr(self) -> str:
        return f"gate={self._names()[1]}, pool={self.pool}"

    @classmethod
    def from_module(cls, m: nn.Module) -> "EffectiveSEModule":
        """Wrap a timm ``EffectiveSEModule``, sharing its parameters."""
        _original_forward(m, "timm.layers.squeeze_excite", "EffectiveSEModule")
        check_pointwise_conv(m.fc, "fc", m.fc.in_channels, m.fc.in_channels)
        new = _adopt(cls, m, fc=m.fc, gate=m.gate)
        new.add_maxpool = bool(m.add_maxpool)
        new._names()
        return new


class EfficientNetSqueezeExcite(_SqueezeExciteBase):
    r"""The ``SqueezeExcite`` of timm's EfficientNet / MobileNetV3 / MixNet blocks
    (``timm.models._efficientnet_blocks``), fused: y = x * gate(conv_expand(act1(conv_reduce(mean_hw(x))))).
    The arguments are timm's (``rd_round_fn`` defaults to ``round``)."""

    def __init__(self, in_chs: int, rd_ratio: float = 0.25, rd_channels: Optional[int] = None,
                 act_layer: ActivationSpec = nn.ReLU, gate_layer: ActivationSpec = nn.Sigmoid,
                 force_act_layer: Optional[ActivationSpec] = None, rd_round_fn: Optional[Callable] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        fn = "EfficientNetSqueezeExcite"
        check_positive_int(fn, "in_chs", in_chs)
        dd = dict(device=device, dtype=dtype)
        if rd_channels is None:
            rd_channels = (rd_round_fn or round)(in_chs * rd_ratio)
            if isinstance(rd_channels, int) and rd_channels < 1:
                raise InputError(f"{fn}: rd_channels (in_chs * rd_ratio = {in_chs} * {rd_ratio}, rounded) must be "
                                 f">= 1, got {rd_channels}; raise rd_ratio or pass rd_channels")
        check_positive_int(fn, "rd_channels", rd_channels)
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True, **dd)
        self.act1 = make_activation(force_act_layer or act_layer, "act_layer")
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True, **dd)
        self.gate = make_activation(gate_layer, "gate_layer")
        gate_name(self.gate, "gate_layer")
        self._names()

    def _fcs(self):
        return self.conv_reduce, self.conv_expand, None

    def _names(self):
        gate = gate_name(self.gate)
        return activation_name(self.act1, "act1"), gate

    @classmethod
    def from_module(cls, m: nn.Module) -> "EfficientNetSqueezeExcite":
        """Wrap the ``SqueezeExcite`` of a timm EfficientNet-family block, sharing its parameters."""
        _original_forward(m, "timm.models._efficientnet_blocks", "SqueezeExcite")
        check_pointwise_conv(m.conv_reduce, "conv_reduce")
        check_pointwise_conv(m.conv_expand, "conv_expand", m.conv_reduce.out_channels,
                             m.conv_reduce.in_channels)
        new = _adopt(cls, m, conv_reduce=m.conv_reduce, act1=m.act1, conv_expand=m.conv_expand, gate=m.gate)
        new._names()
        return new


class EcaModule(nn.Module):
    r"""timm's ``EcaModule`` (ECA-Net, ECA-ResNets), fused: y = x * gate(conv1d_k(mean_hw(x))) with the
    1-D convolution across channels. The arguments are timm's; its experimental ``use_mlp`` mode is
    not offered (``from_module`` refuses it)."""

    def __init__(self, channels: Optional[int] = None, kernel_size: int = 3, gamma: float = 2, beta: float = 1,
                 gate_layer: ActivationSpec = "sigmoid", device=None, dtype=None) -> None:
        super().__init__()
        if channels is not None:  # the adaptive kernel size of the paper, as timm computes it
            check_positive_int("EcaModule", "channels", channels)
            gamma = check_finite_float("EcaModule", "gamma", gamma, positive=True)
            beta = check_finite_float("EcaModule", "beta", beta)
            t = int(abs(math.log(channels, 2) + beta) / gamma)
            kernel_size = max(t if t % 2 else t + 1, 3)
        check_positive_int("EcaModule", "kernel_size", kernel_size, odd=True)
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=False,
                              device=device, dtype=dtype)
        self.gate = make_activation(gate_layer, "gate_layer")
        gate_name(self.gate, "gate_layer")

    def _gate_name(self) -> str:
        gate = gate_name(self.gate)
        return gate

    def forward(self, x: Tensor) -> Tensor:
        return _efficient_channel_attention(x, self.conv.weight, self._gate_name())

    def extra_repr(self) -> str:
        return f"kernel_size={self.conv.kernel_size[0]}, gate={self._gate_name()}"

    @classmethod
    def from_module(cls, m: nn.Module) -> "EcaModule":
        """Wrap a timm ``EcaModule``, sharing its parameters."""
        _original_forward(m, "timm.layers.eca", "EcaModule")
        if getattr(m, "conv2", None) is not None:
            raise UnsupportedLayerError("EcaModule with use_mlp=True (timm's experimental MLP mode)")
        conv = m.conv
        k = conv.kernel_size[0] if type(conv) is nn.Conv1d else 0
        if type(conv) is not nn.Conv1d or (conv.in_channels, conv.out_channels, conv.bias is None, conv.stride,
                                           conv.padding, conv.dilation, conv.groups, conv.padding_mode) != \
                (1, 1, True, (1,), ((k - 1) // 2,), (1,), 1, "zeros") or k % 2 != 1:
            raise UnsupportedLayerError(f"conv must be Conv1d(1, 1, k odd, padding (k-1)//2, no bias), got {conv!r}")
        new = _adopt(cls, m, conv=conv, gate=m.gate)
        new._gate_name()
        return new
