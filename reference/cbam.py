"""Reference CBAM: channel attention followed by spatial attention.

Paper: Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", arXiv 1807.06521.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import activation_fn, gate_fn
from .squeeze_excite import _as_matrix

__all__ = ["cbam", "SPATIAL_ORDERS"]

#: Order of the two maps fed to the spatial conv: timm stacks [mean_c, max_c], the paper's code
#: stacks [max_c, mean_c].
SPATIAL_ORDERS = ("mean_max", "max_mean")


def cbam(
    x: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    conv_weight: Tensor,
    fc1_bias: Optional[Tensor] = None,
    fc2_bias: Optional[Tensor] = None,
    conv_bias: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    gate: str = "sigmoid",
    channel_gate: Optional[str] = None,
    light: bool = False,
    spatial_order: str = "mean_max",
    bn_weight: Optional[Tensor] = None,
    bn_bias: Optional[Tensor] = None,
    bn_running_mean: Optional[Tensor] = None,
    bn_running_var: Optional[Tensor] = None,
    bn_training: bool = False,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
) -> Tensor:
    r"""y = x1 * sa(x1), x1 = x * ca(x).

    .. math::
        ca = \sigma(\mathrm{MLP}(\mathrm{avg}_{hw} x) + \mathrm{MLP}(\mathrm{max}_{hw} x)),\quad
        sa = \sigma(\mathrm{BN}(\mathrm{conv}_{k\times k}([\mathrm{mean}_c x_1; \max_c x_1])))

    MLP(z) = fc2(act(fc1(z))), shared by both pools. Shapes: x (N, C, H, W) in any memory format;
    fc1_weight (Cr, C) or (Cr, C, 1, 1); fc2_weight (C, Cr) or (C, Cr, 1, 1); conv_weight
    (1, 2, k, k), or (1, 1, k, k) when ``light``; padding k // 2.

    Variants:
      * timm ``CbamModule``: the defaults (no MLP biases, BatchNorm after the conv).
      * timm ``LightCbamModule`` (``light=True``): one MLP over 0.5*avg + 0.5*max with a sigmoid
        channel gate, and a 1 -> 1 channel conv over 0.5*mean_c + 0.5*max_c (timm applies a sigmoid
        spatial gate there whatever its ``gate_layer``: keep ``gate="sigmoid"`` to mirror it).
      * the paper's module: MLP biases, ``spatial_order="max_mean"``, BatchNorm with momentum 0.01.
    ``gate`` is the spatial gate and, unless ``channel_gate`` is given, the channel gate too (timm
    uses one ``gate_layer`` for both; its light variant always uses sigmoid for the channel gate).

    BatchNorm of the spatial conv output (one channel) runs when ``bn_running_mean`` or
    ``bn_weight`` is given: ``bn_training=True`` normalises with batch statistics and updates the
    running statistics in place, as ``nn.BatchNorm2d`` does in training mode, with factor
    ``bn_momentum`` (BatchNorm's ``momentum=None``, a cumulative average, is not supported).
    """
    act = activation_fn(activation)
    w1, w2 = _as_matrix(fc1_weight), _as_matrix(fc2_weight)

    def mlp(z: Tensor) -> Tensor:
        return F.linear(act(F.linear(z, w1, fc1_bias)), w2, fc2_bias)

    avg, mx = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
    if light:
        ca = gate_fn(channel_gate or "sigmoid")(mlp(0.5 * avg + 0.5 * mx))
    else:
        ca = gate_fn(channel_gate or gate)(mlp(avg) + mlp(mx))
    x1 = x * ca[:, :, None, None]

    mean_c, max_c = x1.mean(dim=1, keepdim=True), x1.amax(dim=1, keepdim=True)
    if light:
        maps = 0.5 * mean_c + 0.5 * max_c
    elif spatial_order == "mean_max":
        maps = torch.cat([mean_c, max_c], dim=1)
    elif spatial_order == "max_mean":
        maps = torch.cat([max_c, mean_c], dim=1)
    else:
        raise ValueError(f"spatial_order must be one of {SPATIAL_ORDERS}, got {spatial_order!r}")
    k = conv_weight.shape[-1]
    logits = F.conv2d(maps, conv_weight, conv_bias, padding=k // 2)
    if bn_weight is not None or bn_running_mean is not None:
        logits = F.batch_norm(logits, bn_running_mean, bn_running_var, bn_weight, bn_bias,
                              training=bn_training, momentum=bn_momentum, eps=bn_eps)
    return x1 * gate_fn(gate)(logits)
