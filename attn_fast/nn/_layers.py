"""What the drop-in modules need to know about the layers they replace: which activation or gate a
module computes (by its exact class, so a subclass with its own forward is never mistaken for it),
and whether a convolution is the pointwise one the kernels assume."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.fx
from torch import nn

from .._validate import FLOAT_DTYPES, InputError, InputTypeError, check_tensor

__all__ = ["UnsupportedLayerError", "activation_name", "gate_name", "make_activation", "ActivationSpec",
           "check_pointwise_conv", "make_divisible", "check_input", "cast_for_autocast", "autocast_off", "fx_traced"]

#: What a constructor takes for an activation or gate: a name (ours or timm's), a module class (or
#: any callable returning a module, as torchvision takes), or a module.
ActivationSpec = Union[str, Callable[..., nn.Module], nn.Module]


class UnsupportedLayerError(ValueError):
    """A layer whose configuration the attn_fast modules do not cover (``from_module`` raises it;
    ``attn_fast.convert`` leaves such layers alone and reports why)."""


#: Exact classes (by "module.qualname", so timm need not be imported) -> attn_fast's names.
_BY_CLASS: Dict[str, str] = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.ReLU6": "relu6",
    "torch.nn.modules.activation.SiLU": "silu",
    "torch.nn.modules.activation.Hardswish": "hardswish",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.Hardsigmoid": "hardsigmoid",
    "timm.layers.activations.Swish": "silu",
    "timm.layers.activations.GELU": "gelu",
    "timm.layers.activations.GELUTanh": "gelu_tanh",
    "timm.layers.activations.HardSwish": "hardswish",
    "timm.layers.activations.HardSigmoid": "hardsigmoid",
    "timm.layers.activations.Sigmoid": "sigmoid",
    "timm.layers.activations_me.SwishMe": "silu",
    "timm.layers.activations_me.HardSwishMe": "hardswish",
    "timm.layers.activations_me.HardSigmoidMe": "hardsigmoid",
}

_BY_TYPE: Dict[type, str] = {}

#: Names a constructor accepts (ours and timm's aliases) -> attn_fast's names.
_ALIASES: Dict[str, str] = {
    "identity": "identity", "relu": "relu", "relu6": "relu6", "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_tanh": "gelu_tanh", "hardswish": "hardswish", "hard_swish": "hardswish",
    "sigmoid": "sigmoid", "hardsigmoid": "hardsigmoid", "hard_sigmoid": "hardsigmoid",
}

_MODULES: Dict[str, Callable[[], nn.Module]] = {
    "identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid,
    "hardsigmoid": nn.Hardsigmoid,
}


def activation_name(module: nn.Module, what: str = "activation") -> str:
    """attn_fast's name for what ``module`` computes, or UnsupportedLayerError."""
    cls = type(module)
    if cls is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    name = _BY_TYPE.get(cls)  # the forward asks on every call: a dict hit, not a qualified name to build
    if name is None:
        name = _BY_CLASS.get(f"{cls.__module__}.{cls.__qualname__}")
        if name is not None:
            _BY_TYPE[cls] = name
    if name is None:
        raise UnsupportedLayerError(
            f"{what} {cls.__qualname__} is not one the kernels compute (they take "
            f"{sorted(set(_BY_CLASS.values()) | {'gelu'})})")
    return name


def gate_name(module: nn.Module, what: str = "gate") -> str:
    """attn_fast's name for the gate ``module`` computes: sigmoid or hardsigmoid, else
    UnsupportedLayerError."""
    name = activation_name(module, what)
    if name not in ("sigmoid", "hardsigmoid"):
        raise UnsupportedLayerError(f"{what} must be a sigmoid or hardsigmoid, got {name}")
    return name


def make_activation(spec: ActivationSpec, what: str = "activation") -> nn.Module:
    """A module for ``spec`` (a name, a module class or factory, or a module); checks that the
    kernels compute it."""
    if isinstance(spec, str):
        name = _ALIASES.get(spec.lower())
        if name is None:
            raise InputError(f"{what} must be one of {sorted(_ALIASES)}, got {spec!r}")
        module = _MODULES[name]()
    elif isinstance(spec, nn.Module):
        module = spec
    elif callable(spec):
        module = spec()
        if not isinstance(module, nn.Module):
            raise InputTypeError(f"{what}: calling {spec!r} gave {type(module).__name__}, not an nn.Module")
    else:
        raise InputTypeError(f"{what} must be a name, an nn.Module class or an nn.Module, got {type(spec).__name__}")
    activation_name(module, what)
    return module


def check_pointwise_conv(conv: nn.Module, name: str, in_channels: Optional[int] = None,
                         out_channels: Optional[int] = None) -> None:
    """``conv`` is an nn.Conv2d with a 1x1 kernel, stride 1, no padding or dilation, one group: a
    linear map of the channels (the kernels' fc). UnsupportedLayerError otherwise."""
    if type(conv) is not nn.Conv2d:
        raise UnsupportedLayerError(f"{name} is {type(conv).__qualname__}, expected a 1x1 nn.Conv2d")
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((1, 1), (1, 1), (0, 0),
                                                                                     (1, 1), 1):
        raise UnsupportedLayerError(
            f"{name} must be a plain 1x1 conv (stride 1, no padding, no dilation, groups 1), got "
            f"kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, dilation "
            f"{conv.dilation}, groups {conv.groups}")
    if in_channels is not None and conv.in_channels != in_channels:
        raise UnsupportedLayerError(f"{name} takes {conv.in_channels} channels, expected {in_channels}")
    if out_channels is not None and conv.out_channels != out_channels:
        raise UnsupportedLayerError(f"{name} gives {conv.out_channels} channels, expected {out_channels}")


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None,
                   round_limit: float = 0.9) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``min_value``, default the
    divisor), one step up if that fell below ``round_limit * value``: the channel rounding timm's
    layers use, so the same arguments build the same shapes."""
    floor = divisor if min_value is None else min_value
    out = max(floor, int(value + divisor / 2) // divisor * divisor)
    if out < round_limit * value:
        out += divisor
    return out


def cast_for_autocast(w: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """Under autocast the layers being replaced run their convolutions in the autocast dtype; the
    fused ops take the parameters in x's dtype, so cast them (a differentiable cast) there."""
    if w is None or w.dtype == x.dtype or not torch.is_autocast_enabled(x.device.type):
        return w
    return w.to(x.dtype)


def autocast_off(x: torch.Tensor):
    """A context in which a fused op runs: autocast off for x's device (a no-op when it is off).
    The modules hand the op its weights in x's dtype (``cast_for_autocast``) and the op picks its own
    internal precision; autocast reaching inside would run its fp32 parts (CBAM's k x k conv and
    BatchNorm on the spatial map, the reference's accumulations) in 16 bits."""
    if _autocast_on(x.device):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def fx_traced(*values) -> bool:
    """Whether any of ``values`` is a ``torch.fx.Proxy``: the module is being symbolically traced, so
    its eager input checks (which read shapes and dtypes) cannot run; the traced graph runs them."""
    return any(isinstance(v, torch.fx.Proxy) for v in values)


def _autocast_on(device: torch.device) -> bool:
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (the modules then cast their parameters to x's dtype and
    run the op with autocast off)."""
    return _autocast_on(x.device)


def check_input(owner: str, name: str, x, weight: torch.Tensor, *, ndims: Sequence[int] = (), legend: str = "",
                channels: Optional[int] = None, dim: int = 1, unit: str = "channels") -> torch.Tensor:
    """A module's input ``x``: a floating tensor of one of ``ndims``, with ``channels`` along ``dim``, on
    the device of the module's ``weight`` and (unless autocast is on, which casts) of its dtype."""
    check_tensor(owner, name, x, ndims=ndims, dtypes=FLOAT_DTYPES, legend=legend)
    if channels is not None and x.shape[dim] != channels:
        raise InputError(f"{owner}: {name} must have {channels} {unit} (dim {dim}), got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise InputError(f"{owner}: {name} is on {x.device} but the module's parameters are on {weight.device}; "
                         "move them to the same device")
    if x.dtype != weight.dtype and not _autocast_on(x.device):
        raise InputTypeError(f"{owner}: {name} has dtype {x.dtype} but the module's parameters have {weight.dtype}; "
                        "they must match (convert the module with .to(dtype), or run under torch.autocast)")
    return x
