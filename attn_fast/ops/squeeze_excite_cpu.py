"""The CPU path of squeeze_excite: the reference's formula in fewer torch calls.

On small maps (a batch of one image at 7x7 or 14x14) each torch call costs a few microseconds of
dispatch, about as much as its arithmetic, so the count of calls decides the speed. The mean over
H, W is folded into fc1's matmul (a sum, then ``addmm`` with alpha = 1 / (H * W)), ReLU and sigmoid
run in place on fresh results, and the gate broadcasts through a view instead of an indexing call.
This runs in fp32 only: in 16 bits the reordered rounding (a sum, then the scale inside the matmul)
measured up to 1.2x the numerics rule's bound on a few fuzz draws (fc1's bias gradient, fp16), and
computing the excitation in fp32 instead moved the excess to bf16 gradients (the backward's
sum(dy * x) still rounds in 16 bits, where the kernels accumulate it in fp32); 16-bit CPU inputs take
the reference, which is the rule's own same-dtype baseline.

Everything else (16-bit inputs, an empty map, a norm layer, avg+max pooling, fc1 without a bias)
runs the reference, which is the definition; the edge-case table and the fuzz profiles hold this path to it
by the numerics rule under ``set_backend("cpu")``. (CBAM's CPU path is the reference: stacking its
two MLP passes into one (2N x C) matmul measured slower than two matrix-vector products at N = 1.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..reference import ACTIVATIONS, GATES


def _matrix(w: Tensor) -> Tensor:
    """A 1x1-conv (out, in, 1, 1) or linear (out, in) weight as (out, in)."""
    return w if w.dim() == 2 else w.flatten(1)


def _activate(h: Tensor, name: str) -> Tensor:
    """The activation on a fresh result ``h`` (in place where autograd allows it: ReLU keeps its output)."""
    return torch.relu_(h) if name == "relu" else ACTIVATIONS[name](h)


def _gate(h: Tensor, name: str) -> Tensor:
    """The gate on a fresh result ``h`` (sigmoid in place: its backward reads its output)."""
    return torch.sigmoid_(h) if name == "sigmoid" else GATES[name](h)


def squeeze_excite(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor],
                   fc2_bias: Optional[Tensor], activation: str, gate: str, pool: str, norm) -> Tensor:
    """Inputs checked by attn_fast.functional; the meaning of attn_fast.reference.squeeze_excite."""
    if norm is not None or pool != "avg" or fc1_bias is None or x.numel() == 0 or x.dtype != torch.float32:
        return reference.squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation=activation,
                                        gate=gate, pool=pool, norm=norm)
    n, c, h, w = x.shape
    # fc1(mean) = (sum @ W1^T) / (H W) + b1, in one call
    hidden = torch.addmm(fc1_bias, x.sum(dim=(2, 3)), _matrix(fc1_weight).t(), alpha=1.0 / (h * w))
    if fc2_weight is not None:
        hidden = F.linear(_activate(hidden, activation), _matrix(fc2_weight), fc2_bias)
    return x * _gate(hidden, gate).view(n, c, 1, 1)
