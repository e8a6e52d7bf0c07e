"""The public functions of attn_fast: validate the inputs once, then run the op (attn_fast.ops), which
picks the Triton kernels or the PyTorch reference (attn_fast.dispatch)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import ops
from ._validate import (
    FLOAT_DTYPES, check_bool, check_choice, check_nonnegative_float, check_probability, check_same, check_scale,
    check_shape, check_tensor)
from .reference import ACTIVATIONS, CAUSAL_ALIGNMENTS, GATES, POOLS, SPATIAL_ORDERS

__all__ = ["scaled_dot_product_attention", "squeeze_excite", "efficient_channel_attention", "cbam", "MAX_HEAD_DIM"]

#: Largest query/key and value head size the kernels take (on every device, so a model that runs
#: on the CPU path also runs on a GPU).
MAX_HEAD_DIM = 256


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    causal_alignment: str = "top_left",
    deterministic: bool = False,
) -> Tensor:
    r"""Fused softmax(Q K^T * scale + mask) V; a drop-in for
    ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query (Tensor): (B, Hq, Lq, E) or (Hq, Lq, E); fp16, bf16, fp32 (kernels) or fp64 (reference).
            Strided views such as ``x.view(B, L, H, E).transpose(1, 2)`` are fine.
        key (Tensor): (B, Hk, Lk, E); Hk == Hq, or Hq % Hk == 0 with ``enable_gqa``.
        value (Tensor): (B, Hk, Lk, Ev); Ev may differ from E. 1 <= E, Ev <= 256.
        attn_mask (Tensor, optional): bool (True = may attend) or additive float mask of query's
            dtype, broadcastable to (B, Hq, Lq, Lk). May be combined with ``is_causal``.
        dropout_p (float): dropout probability on the attention weights, in [0, 1). The kernels draw
            the keep-mask with Philox from a seed taken from torch's default CPU generator, so
            ``torch.manual_seed`` makes it reproducible; ``attn_fast.ops.attention.dropout_keep_mask``
            regenerates the exact mask (``draw_dropout_seed`` after the same ``manual_seed``).
        is_causal (bool): causal mask, aligned by ``causal_alignment``.
        scale (float, optional): score scale, default 1/sqrt(E).
        enable_gqa (bool): grouped-query / multi-query attention.
        causal_alignment (str): "top_left" (torch's ``is_causal``: query i sees keys j <= i) or
            "lower_right" (query i sees keys j <= i + Lk - Lq, as FlashAttention).
        deterministic (bool): bitwise reproducible forward and backward, in every process. The
            forward and dq, dk, dv are reproducible within a process anyway (no atomics); this mode
            also takes fixed tile configs instead of timed ones and sums a broadcast float mask's
            gradient without atomics (through an fp32 (B, Hq, Lq, Lk) buffer).
            ``torch.use_deterministic_algorithms(True)`` turns it on for every call.

    Returns:
        Tensor (B, Hq, Lq, Ev) in query's dtype. Rows whose keys are all masked give zeros.
    """
    fn = "scaled_dot_product_attention"
    legend = "(B, H, L, E) or (H, L, E)"
    check_tensor(fn, "query", query, ndims=(3, 4), legend=legend)
    check_tensor(fn, "key", key, ndims=(query.dim(),), legend=f"like query ({query.dim()}-D)")
    check_tensor(fn, "value", value, ndims=(query.dim(),), legend=f"like query ({query.dim()}-D)")
    check_same(fn, ("query", query), ("key", key), ("value", value))
    *batch_q, hq, lq, e = query.shape
    *batch_k, hk, lk, ek = key.shape
    *batch_v, hv, lv, ev = value.shape
    if not (batch_q == batch_k == batch_v):
        raise ValueError(f"{fn}: batch sizes differ: query {tuple(batch_q)}, key {tuple(batch_k)}, "
                         f"value {tuple(batch_v)}")
    if ek != e:
        raise ValueError(f"{fn}: key head size {ek} != query head size {e} (last dims must match)")
    if lv != lk:
        raise ValueError(f"{fn}: value length {lv} != key length {lk} (dim -2 must match)")
    if hv != hk:
        raise ValueError(f"{fn}: value has {hv} heads but key has {hk}")
    for name, size in (("query/key head size", e), ("value head size", ev)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"{fn}: {name} must be in 1..{MAX_HEAD_DIM}, got {size}")
    check_bool(fn, "is_causal", is_causal)
    check_bool(fn, "enable_gqa", enable_gqa)
    if hq != hk:
        if not enable_gqa:
            raise ValueError(f"{fn}: query has {hq} heads but key/value have {hk}; "
                             "for grouped-query attention set enable_gqa=True")
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"{fn}: with enable_gqa, query heads ({hq}) must be a multiple of "
                             f"key/value heads ({hk})")
    if attn_mask is not None:
        check_tensor(fn, "attn_mask", attn_mask, dtypes=(torch.bool, query.dtype))
        check_same(fn, ("query", query), ("attn_mask", attn_mask), dtype=False)
        target = (*batch_q, hq, lq, lk)
        try:
            fits = attn_mask.dim() <= len(target) and torch.broadcast_shapes(attn_mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                             f"to {target} ({'B, ' if batch_q else ''}Hq, Lq, Lk)")
    dropout_p = check_probability(fn, "dropout_p", dropout_p)
    scale = check_scale(fn, scale)
    check_choice(fn, "causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    check_bool(fn, "deterministic", deterministic)
    return ops.attention.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_alignment, deterministic)


def _check_fc(fn: str, name: str, w: Tensor, out_features: Optional[int], in_features: int) -> int:
    """A 1x1-conv (out, in, 1, 1) or linear (out, in) weight; returns ``out``."""
    check_tensor(fn, name, w, ndims=(2, 4))
    if w.dim() == 4 and tuple(w.shape[2:]) != (1, 1):
        raise ValueError(f"{fn}: {name} must be a 1x1 conv weight (out, in, 1, 1), got {tuple(w.shape)}")
    out = out_features if out_features is not None else w.shape[0]
    if out < 1:
        raise ValueError(f"{fn}: {name} must have at least one output channel (dim 0), got shape {tuple(w.shape)}")
    if w.shape[0] != out or w.shape[1] != in_features:
        raise ValueError(f"{fn}: {name} must have shape ({out}, {in_features}) or "
                         f"({out}, {in_features}, 1, 1), got {tuple(w.shape)}")
    return out


def _check_image(fn: str, x, *, max_pool: bool = False) -> Tensor:
    """x is (N, C, H, W) with C >= 1 (and H * W >= 1 where the op takes a max over H, W)."""
    check_tensor(fn, "x", x, ndims=(4,), legend="(N, C, H, W)")
    if x.shape[1] < 1:
        raise ValueError(f"{fn}: x must have at least one channel (dim 1), got shape {tuple(x.shape)}")
    if max_pool and x.shape[2] * x.shape[3] < 1:
        raise ValueError(f"{fn}: x must have H * W >= 1 (the op takes a max over H, W), got shape {tuple(x.shape)}")
    return x


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
    r"""Fused squeeze-and-excitation: y = x * gate(fc2(act(norm(fc1(pool_hw(x)))))).

    Args:
        x (Tensor): (N, C, H, W), NCHW or channels_last; the output has x's memory format.
        fc1_weight (Tensor): (Cr, C) or (Cr, C, 1, 1). With no ``fc2_weight`` (timm's
            EffectiveSE, a single fc) it must be (C, C).
        fc1_bias (Tensor, optional): (Cr,).
        fc2_weight (Tensor, optional): (C, Cr) or (C, Cr, 1, 1).
        fc2_bias (Tensor, optional): (C,).
        activation (str): between the fcs: relu, relu6, silu, gelu, gelu_tanh, hardswish, identity.
        gate (str): sigmoid or hardsigmoid.
        pool (str): "avg" (mean over H, W) or "avgmax" (0.5 * mean + 0.5 * max; timm's add_maxpool).
        norm (callable, optional): a norm layer between fc1 and the activation (timm SEModule's
            ``norm_layer``), called on an (N, Cr, 1, 1) tensor; needs ``fc2_weight``. A BatchNorm in
            eval mode is folded into fc1 (fully fused); any other norm (BatchNorm in training mode,
            which also updates its running statistics) runs in PyTorch between the pooling and
            scaling kernels, which costs one more pass over x in the backward.
    """
    fn = "squeeze_excite"
    _check_image(fn, x, max_pool=pool == "avgmax")
    c = x.shape[1]
    cr = _check_fc(fn, "fc1_weight", fc1_weight, None if fc2_weight is not None else c, c)
    check_shape(fn, "fc1_bias", fc1_bias, [(cr,)])
    if fc2_weight is not None:
        _check_fc(fn, "fc2_weight", fc2_weight, c, cr)
    elif fc2_bias is not None:
        raise ValueError(f"{fn}: fc2_bias was given without fc2_weight")
    check_shape(fn, "fc2_bias", fc2_bias, [(c,)])
    check_same(fn, ("x", x), ("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
               ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias))
    check_choice(fn, "activation", activation, tuple(ACTIVATIONS))
    check_choice(fn, "gate", gate, tuple(GATES))
    check_choice(fn, "pool", pool, POOLS)
    if norm is not None:
        if not callable(norm):
            raise TypeError(f"{fn}: norm must be a callable (a norm layer), got {type(norm).__name__}")
        if fc2_weight is None:
            raise ValueError(f"{fn}: norm needs a hidden layer (fc2_weight); a single fc has none")
    return ops.squeeze_excite.squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                             activation, gate, pool, norm)


def efficient_channel_attention(x: Tensor, conv_weight: Tensor, *, gate: str = "sigmoid") -> Tensor:
    r"""Fused ECA (efficient channel attention): y = x * gate(conv1d_k(mean_hw(x))), a 1-D convolution
    across channels (no bias, zero padding (k - 1) // 2) in place of SE's MLP; timm's ``EcaModule``.

    Args:
        x (Tensor): (N, C, H, W), NCHW or channels_last; the output has x's memory format.
        conv_weight (Tensor): (1, 1, k) or (k,), k odd (timm's ``conv.weight``).
        gate (str): sigmoid or hardsigmoid.
    """
    fn = "efficient_channel_attention"
    _check_image(fn, x)
    check_tensor(fn, "conv_weight", conv_weight, ndims=(1, 3))
    k = conv_weight.shape[-1]
    if conv_weight.numel() != k or k % 2 == 0:
        raise ValueError(f"{fn}: conv_weight must have shape (1, 1, k) or (k,) with k odd, "
                         f"got {tuple(conv_weight.shape)}")
    check_same(fn, ("x", x), ("conv_weight", conv_weight))
    check_choice(fn, "gate", gate, tuple(GATES))
    return ops.squeeze_excite.efficient_channel_attention(x, conv_weight, gate)


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
    r"""Fused CBAM: channel attention then spatial attention (see ``attn_fast.reference.cbam``).

    Args:
        x (Tensor): (N, C, H, W), NCHW or channels_last.
        fc1_weight (Tensor): (Cr, C) or (Cr, C, 1, 1); fc2_weight (Tensor): (C, Cr) or (C, Cr, 1, 1).
        conv_weight (Tensor): (1, 2, k, k), or (1, 1, k, k) when ``light``; k odd, padding k // 2.
        fc1_bias, fc2_bias, conv_bias (Tensor, optional): (Cr,), (C,), (1,).
        activation, gate, channel_gate: activation of the MLP; spatial gate and (unless
            ``channel_gate``) channel gate.
        light (bool): timm's LightCbamModule.
        spatial_order (str): "mean_max" (timm) or "max_mean" (the paper's code).
        bn_* : BatchNorm of the spatial conv output (1 channel): weight, bias, running mean and
            var (1,), any float dtype (fp32 state with a 16-bit x, as under autocast); ``bn_training=True``
            uses batch statistics and updates the running ones.
    """
    fn = "cbam"
    _check_image(fn, x, max_pool=True)
    c = x.shape[1]
    cr = _check_fc(fn, "fc1_weight", fc1_weight, None, c)
    _check_fc(fn, "fc2_weight", fc2_weight, c, cr)
    check_shape(fn, "fc1_bias", fc1_bias, [(cr,)])
    check_shape(fn, "fc2_bias", fc2_bias, [(c,)])
    check_tensor(fn, "conv_weight", conv_weight, ndims=(4,), legend="(1, 2, k, k)")
    check_bool(fn, "light", light)
    maps = 1 if light else 2
    k = conv_weight.shape[-1]
    if tuple(conv_weight.shape) != (1, maps, k, k) or k % 2 == 0:
        raise ValueError(f"{fn}: conv_weight must have shape (1, {maps}, k, k) with k odd"
                         f"{' (light=True)' if light else ''}, got {tuple(conv_weight.shape)}")
    check_shape(fn, "conv_bias", conv_bias, [(1,)])
    bn = (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("bn_running_mean", bn_running_mean),
          ("bn_running_var", bn_running_var))
    for name, t in bn:
        if t is not None:
            check_tensor(fn, name, t, dtypes=FLOAT_DTYPES)
            check_shape(fn, name, t, [(1,)])
    if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float)) or not 0.0 <= bn_momentum <= 1.0:
        raise ValueError(f"{fn}: bn_momentum must be a float in [0, 1] (BatchNorm's momentum=None is not "
                         f"supported), got {bn_momentum!r}")
    bn_eps = check_nonnegative_float(fn, "bn_eps", bn_eps)
    if (bn_running_mean is None) != (bn_running_var is None):
        raise ValueError(f"{fn}: give both bn_running_mean and bn_running_var, or neither")
    if bn_running_mean is None and bn_weight is not None and not bn_training:
        raise ValueError(f"{fn}: BatchNorm in eval mode (bn_training=False) needs bn_running_mean "
                         "and bn_running_var")
    check_same(fn, ("x", x), ("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight),
               ("conv_weight", conv_weight), ("fc1_bias", fc1_bias), ("fc2_bias", fc2_bias),
               ("conv_bias", conv_bias))
    check_same(fn, ("x", x), *bn, dtype=False)  # BatchNorm state may be fp32 under autocast
    check_choice(fn, "activation", activation, tuple(ACTIVATIONS))
    check_choice(fn, "gate", gate, tuple(GATES))
    if channel_gate is not None:
        check_choice(fn, "channel_gate", channel_gate, tuple(GATES))
    check_bool(fn, "bn_training", bn_training)
    if bn_training and (bn_weight is not None or bn_running_mean is not None) and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"{fn}: BatchNorm in training mode needs more than one value per channel: "
                         f"x {tuple(x.shape)} gives N * H * W = {x.shape[0] * x.shape[2] * x.shape[3]}")
    check_choice(fn, "spatial_order", spatial_order, SPATIAL_ORDERS)
    return ops.cbam.cbam(
        x, fc1_weight, fc2_weight, conv_weight, fc1_bias, fc2_bias, conv_bias,
        activation=activation, gate=gate, channel_gate=channel_gate, light=light,
        spatial_order=spatial_order, bn_weight=bn_weight, bn_bias=bn_bias,
        bn_running_mean=bn_running_mean, bn_running_var=bn_running_var, bn_training=bn_training,
        bn_momentum=bn_momentum, bn_eps=bn_eps)
