"""The activation and gate functions that SE and CBAM layers use, by name."""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "GATES", "activation_fn", "gate_fn"]

ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda t: t,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "hardswish": F.hardswish,
}

GATES: Dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
}


def _lookup(table: Dict[str, Callable[[Tensor], Tensor]], name: str, what: str) -> Callable[[Tensor], Tensor]:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(table)}, got {name!r}") from None


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name`` (one of :data:`ACTIVATIONS`)."""
    return _lookup(ACTIVATIONS, name, "activation")


def gate_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The gate called ``name`` (one of :data:`GATES`)."""
    return _lookup(GATES, name, "gate")
