"""Drop-in CBAM module running the fused op (``attn_fast.cbam``), for timm's ``CbamModule`` and
``LightCbamModule``: same constructor arguments, same submodule names (``channel.fc1``,
``channel.fc2``, ``spatial.conv.conv``, ``spatial.conv.bn``), so the same state_dict keys; and
``CBAM.from_module(m)``, which keeps ``m``'s own submodules (parameters and BatchNorm buffers shared).
"""
from __future__ import annotations

from typing import Optional

import torch.fx
from torch import Tensor, nn

from .. import functional
from .._validate import check_bool, check_positive_int
from ._layers import (ActivationSpec, UnsupportedLayerError, activation_name, autocast_enabled, autocast_off,
                      cast_for_autocast,
                      check_input, check_pointwise_conv, gate_name, make_activation, make_divisible)
from .squeeze_excite import _adopt, _original_forward

__all__ = ["CBAM"]


def _bn_arguments(bn: nn.Module) -> dict:
    """BatchNorm2d's forward logic, as arguments of attn_fast.cbam (and its side effect on
    num_batches_tracked). The state goes in its own dtype: the op takes BatchNorm state of any float
    dtype, so under autocast (16-bit x, fp32 BatchNorm) it is used as ``nn.BatchNorm2d`` uses it."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_buffers = not bn.training or bn.track_running_stats
    return dict(bn_weight=bn.weight, bn_bias=bn.bias,
                bn_running_mean=bn.running_mean if use_buffers else None,
                bn_running_var=bn.running_var if use_buffers else None,
                bn_training=training, bn_momentum=factor, bn_eps=bn.eps)


def _cbam(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
          conv_weight: Tensor, conv_bias: Optional[Tensor], bn: nn.Module, config: dict) -> Tensor:
    """CBAM's forward once the submodules are picked: the input check, BatchNorm's logic, the autocast
    casts (of the fused op's weights, not of the BatchNorm state, which the op takes in any float
    dtype) and the fused op, with autocast off inside it. A module-level function so that torch.fx
    records it as one call (``torch.fx.wrap`` below): symbolic tracing sees Proxies, not tensors, and
    the checks and BatchNorm's bookkeeping run when the graph runs."""
    if (type(x) is Tensor and x.dim() == 4 and x.dtype == fc1_weight.dtype and x.device == fc1_weight.device
            and x.shape[1] == fc1_weight.shape[1] and not autocast_enabled(x)):
        # the common call (a per-call cost on small maps): nothing to cast, no autocast to turn off
        return functional.cbam(x, fc1_weight, fc2_weight, conv_weight, fc1_bias, fc2_bias, conv_bias, **config,
                               **_bn_arguments(bn))
    check_input("CBAM", "x", x, fc1_weight, ndims=(4,), legend="(N, C, H, W)", channels=fc1_weight.shape[1])
    weights = [cast_for_autocast(w, x) for w in (fc1_weight, fc2_weight, conv_weight, fc1_bias, fc2_bias, conv_bias)]
    bn_arguments = _bn_arguments(bn)
    with autocast_off(x):
        return functional.cbam(x, *weights, **config, **bn_arguments)


torch.fx.wrap("_cbam")


class _ChannelAttn(nn.Module):
    """Holds the shared MLP and the channel gate (timm's ChannelAttn's parameters; no forward of its own)."""

    def __init__(self, channels: int, rd_channels: int, act_layer: ActivationSpec, gate_layer: ActivationSpec,
                 mlp_bias: bool, **dd) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, **dd)
        self.act = make_activation(act_layer, "act_layer")
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, **dd)
        self.gate = make_activation(gate_layer, "gate_layer")


class _ConvNorm(nn.Module):
    """Holds the k x k conv (2 or 1 -> 1 channel, no bias) and its BatchNorm (timm's ConvNormAct)."""

    def __init__(self, in_channels: int, kernel_size: int, **dd) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(1, **dd)


class _SpatialAttn(nn.Module):
    """Holds the spatial conv + BatchNorm and the spatial gate (timm's SpatialAttn's parameters)."""

    def __init__(self, in_channels: int, kernel_size: int, gate_layer: ActivationSpec, **dd) -> None:
        super().__init__()
        self.conv = _ConvNorm(in_channels, kernel_size, **dd)
        self.gate = make_activation(gate_layer, "gate_layer")


class CBAM(nn.Module):
    r"""CBAM (Woo et al. 2018), fused: y = x1 * sa(x1), x1 = x * ca(x), never writing x1.

    The arguments are timm's ``CbamModule``'s; ``light=True`` builds timm's ``LightCbamModule``
    (one MLP over 0.5 * avg + 0.5 * max with a sigmoid channel gate, a 1 -> 1 channel conv over
    0.5 * mean_c + 0.5 * max_c). The spatial conv's BatchNorm behaves as ``nn.BatchNorm2d`` does:
    running statistics in eval mode; batch statistics in training mode, updating the running ones
    (momentum, or the cumulative average with ``momentum=None``) and ``num_batches_tracked``.
    """

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 1, spatial_kernel_size: int = 7, act_layer: ActivationSpec = nn.ReLU,
                 gate_layer: ActivationSpec = "sigmoid", mlp_bias: bool = False, light: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_positive_int("CBAM", "channels", channels)
        check_positive_int("CBAM", "spatial_kernel_size", spatial_kernel_size, odd=True)
        check_bool("CBAM", "light", light)
        if not rd_channels:
            check_positive_int("CBAM", "rd_divisor", rd_divisor)
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        check_positive_int("CBAM", "rd_channels", rd_channels)
        self.light = light
        self.channel = _ChannelAttn(channels, rd_channels, act_layer, gate_layer, mlp_bias, **dd)
        if not light:  # the light module's channel gate is a sigmoid whatever gate_layer is (as timm's)
            gate_name(self.channel.gate, "gate_layer")
        # timm's light spatial half builds its gate without gate_layer (a sigmoid)
        self.spatial = _SpatialAttn(1 if light else 2, spatial_kernel_size, "sigmoid" if light else gate_layer, **dd)
        self._config()

    def _config(self) -> dict:
        """The op's keyword arguments that follow from the submodules (UnsupportedLayerError if any
        is not one the kernels compute)."""
        ch, sp = self.channel, self.spatial
        return dict(activation=activation_name(ch.act, "channel.act"),
                    channel_gate="sigmoid" if self.light else gate_name(ch.gate, "channel.gate"),
                    gate=gate_name(sp.gate, "spatial.gate"), light=self.light)

    def forward(self, x: Tensor) -> Tensor:
        ch, sp = self.channel, self.spatial
        return _cbam(x, ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias, sp.conv.conv.weight,
                     sp.conv.conv.bias, sp.conv.bn, self._config())

    def extra_repr(self) -> str:
        cfg = self._config()
        return (f"light={cfg['light']}, activation={cfg['activation']}, channel_gate={cfg['channel_gate']}, "
                f"gate={cfg['gate']}")

    @classmethod
    def from_module(cls, m: nn.Module) -> "CBAM":
        """Wrap a timm ``CbamModule`` or ``LightCbamModule``, keeping its submodules (so its parameters
        and BatchNorm buffers)."""
        light = type(m).__qualname__ == "LightCbamModule"
        _original_forward(m, "timm.layers.cbam", "LightCbamModule" if light else "CbamModule")
        ch, sp = m.channel, m.spatial
        _original_forward(ch, "timm.layers.cbam", "LightChannelAttn" if light else "ChannelAttn")
        _original_forward(sp, "timm.layers.cbam", "LightSpatialAttn" if light else "SpatialAttn")
        _original_forward(sp.conv, "timm.layers.conv_bn_act", "ConvNormAct")
        check_pointwise_conv(ch.fc1, "channel.fc1")
        check_pointwise_conv(ch.fc2, "channel.fc2", ch.fc1.out_channels, ch.fc1.in_channels)
        conv, bn = sp.conv.conv, sp.conv.bn
        k = conv.kernel_size[0] if type(conv) is nn.Conv2d else 0
        if type(conv) is not nn.Conv2d or (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                           conv.padding, conv.dilation, conv.groups, conv.padding_mode) != \
                (1 if light else 2, 1, (k, k), (1, 1), (k // 2, k // 2), (1, 1), 1, "zeros") or k % 2 != 1:
            raise UnsupportedLayerError(f"spatial.conv.conv must be a {1 if light else 2} -> 1 channel k x k conv "
                                        f"(k odd, stride 1, padding k // 2), got {conv!r}")
        if getattr(sp.conv, "aa", None) is not None and type(sp.conv.aa) is not nn.Identity:
            raise UnsupportedLayerError("spatial.conv has an anti-aliasing layer")
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != 1:
            raise UnsupportedLayerError(f"spatial.conv.bn must be a 1-channel BatchNorm, got {bn!r}")
        for part in ("drop", "act"):
            if type(getattr(bn, part, nn.Identity())) is not nn.Identity:
                raise UnsupportedLayerError(f"spatial.conv.bn.{part} must be Identity")
        if type(bn) is not nn.BatchNorm2d:
            _original_forward(bn, "timm.layers.norm_act", "BatchNormAct2d")
        new = _adopt(cls, m, channel=ch, spatial=sp)
        new.light = light
        new._config()
        return new
