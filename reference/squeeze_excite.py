"""Reference squeeze-and-excitation (channel attention).

Paper: Hu, Shen, Sun, "Squeeze-and-Excitation Networks", arXiv 1709.01507. ECA: Wang et al.,
"ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks", arXiv 1910.03151.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor

from .activations import activation_fn, gate_fn

__all__ = ["squeeze_excite", "excite", "efficient_channel_attention", "POOLS", "channel_pool"]

#: "avg": mean over H, W (the paper). "avgmax": 0.5 * mean + 0.5 * max (timm's ``add_maxpool``).
POOLS = ("avg", "avgmax")


def channel_pool(x: Tensor, pool: str = "avg") -> Tensor:
    """(N, C, H, W) -> (N, C): the squeeze step."""
    if pool == "avg":
        return x.mean(dim=(2, 3))
    if pool == "avgmax":
        return 0.5 * x.mean(dim=(2, 3)) + 0.5 * x.amax(dim=(2, 3))
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def _as_matrix(w: Tensor) -> Tensor:
    """1x1 conv weight (out, in, 1, 1) or linear weight (out, in) -> (out, in)."""
    return w.reshape(w.shape[0], -1)


def squeeze_excite(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor] = None,
    fc2_weight: Optional[Tensor] = None,
    fc2_bias: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    gate: str = "sigmoid",
    pool: str = "avg",
    norm: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    r"""y = x * gate(fc2(act(norm(fc1(pool_hw(x)))))), per sample and channel.

    .. math::
        s = \mathrm{gate}(W_2\,\delta(W_1 z + b_1) + b_2),\quad z_c = \frac{1}{HW}\sum_{h,w} x_{c,h,w},
        \quad y_{c,h,w} = s_c\, x_{c,h,w}

    Shapes: x (N, C, H, W) in any memory format; fc1_weight (Cr, C) or (Cr, C, 1, 1), fc1_bias (Cr,);
    fc2_weight (C, Cr) or (C, Cr, 1, 1), fc2_bias (C,). Returns (N, C, H, W) like x.

    Covers torchvision ``SqueezeExcitation`` (relu, sigmoid), timm ``SEModule`` (``pool="avgmax"`` for
    its ``add_maxpool``; ``norm`` for its optional norm layer between fc1 and the activation, called
    on an (N, Cr, 1, 1) tensor), timm's EfficientNet/MobileNetV3 ``SqueezeExcite``, and timm
    ``EffectiveSEModule``: a single fc (``fc2_weight=None``, fc1 is then (C, C)) with
    ``gate="hardsigmoid"``; with a single fc there is no hidden layer, so ``activation`` and ``norm``
    do not apply.
    """
    s = excite(channel_pool(x, pool), fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation=activation,
               gate=gate, norm=norm)
    return x * s[:, :, None, None]


def excite(
    z: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor] = None,
    fc2_weight: Optional[Tensor] = None,
    fc2_bias: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    gate: str = "sigmoid",
    norm: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """The excitation of :func:`squeeze_excite`: pooled (N, C) rows -> gate values s (N, C)."""
    h = F.linear(z, _as_matrix(fc1_weight), fc1_bias)
    if fc2_weight is not None:
        if norm is not None:
            h = norm(h[:, :, None, None]).flatten(1)
        h = activation_fn(activation)(h)
        h = F.linear(h, _as_matrix(fc2_weight), fc2_bias)
    return gate_fn(gate)(h)


def efficient_channel_attention(x: Tensor, conv_weight: Tensor, *, gate: str = "sigmoid") -> Tensor:
    r"""ECA: y = x * gate(conv1d_k(mean_hw(x))), a 1-D convolution across channels (no bias, zero
    padding (k - 1) // 2) in place of SE's MLP. conv_weight: (1, 1, k) or (k,). Matches timm
    ``EcaModule``.
    """
    k = conv_weight.numel()
    if k % 2 == 0:
        raise ValueError(f"efficient_channel_attention: the conv kernel size must be odd, got {k}")
    z = x.mean(dim=(2, 3)).unsqueeze(1)  # (N, 1, C)
    s = F.conv1d(z, conv_weight.reshape(1, 1, k), padding=(k - 1) // 2).squeeze(1)
    return x * gate_fn(gate)(s)[:, :, None, None]
