"""The public functions of attn_fast: validate the inputs once, then run the op (attn_fast.ops), which
picks the Triton kernels or the PyTorch reference (attn_fast.dispatch)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from ._validate import (
    FLOAT_DTYPES, InputError, InputTypeError, check_bool, check_choice, check_nonnegative_float, check_probability, check_same, check_scale,
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
        query (Tensor): (..., Hq, Lq, E), e.g. (B, Hq, Lq, E), (Hq, Lq, E) or (Lq, E); fp16, bf16, fp32
            (kernels) or fp64 (reference). Strided views such as ``x.view(B, L, H, E).transpose(1, 2)``
            are fine.
        key (Tensor): (..., Hk, Lk, E). The dims before the last two broadcast against query's and
            value's as in torch (any number of batch dims; size-1 batch or head dims expand, without
            copies); with ``enable_gqa``, Hq % Hk == 0 instead.
        value (Tensor): (..., Hk, Lk, Ev); Ev may differ from E. 0 <= E, Ev <= 256 (E = 0: every score
            is 0, so each row is the softmax of the mask alone, as in torch).
        attn_mask (Tensor, optional): bool (True = may attend) or additive float mask of query's
            dtype, broadcastable to (..., Hq, Lq, Lk); or one of torch's ``CausalBias`` masks
            (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``), read as a causal
            flag with its alignment. A tensor mask may be combined with ``is_causal`` (both apply;
            torch rejects the combination). Finite values far below any score (the Hugging Face
            convention ``torch.finfo(dtype).min``) mask a key as -inf does, except that a row masked
            only by such values averages its keys, as in torch, instead of giving zeros.
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
        Tensor (..., Hq, Lq, Ev) in query's dtype, the broadcast batch dims first ((Lq, Ev) for 2-D
        inputs). Rows whose keys are all masked out (False or -inf) give zeros.

    Raises:
        InputError / InputTypeError (ValueError / TypeError that are also RuntimeError, as torch
        raises) naming the argument, before any kernel runs.
    """
    if _ordinary_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                           causal_alignment, deterministic):
        return ops.attention.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                          False, "top_left", False)
    fn = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(fn, name, t)
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise InputError(f"{fn}: query, key and value must be at least 2-D (..., L, E), got "
                         f"{query.dim()}-D, {key.dim()}-D and {value.dim()}-D")
    check_same(fn, ("query", query), ("key", key), ("value", value))
    check_bool(fn, "is_causal", is_causal)
    check_bool(fn, "enable_gqa", enable_gqa)
    check_choice(fn, "causal_alignment", causal_alignment, CAUSAL_ALIGNMENTS)
    e, lq = query.shape[-1], query.shape[-2]
    lk, ek, lv, ev = key.shape[-2], key.shape[-1], value.shape[-2], value.shape[-1]
    if ek != e:
        raise InputError(f"{fn}: key head size {ek} != query head size {e} (last dims must match)")
    if lv != lk:
        raise InputError(f"{fn}: value length {lv} != key length {lk} (dim -2 must match)")
    for name, size in (("query/key head size", e), ("value head size", ev)):
        if size > MAX_HEAD_DIM:
            raise InputError(f"{fn}: {name} must be at most {MAX_HEAD_DIM}, got {size}")
    if _is_causal_bias(attn_mask):  # torch.nn.attention.bias.causal_upper_left / causal_lower_right
        attn_mask, is_causal, causal_alignment = _from_causal_bias(fn, attn_mask, is_causal, causal_alignment,
                                                                   lq, lk)
    q, k, v, batch, gqa = _broadcast_qkv(fn, query, key, value, enable_gqa)
    hq = q.shape[1]
    mask = None
    if attn_mask is not None:
        check_tensor(fn, "attn_mask", attn_mask, dtypes=(torch.bool, query.dtype))
        check_same(fn, ("query", query), ("attn_mask", attn_mask), dtype=False)
        target = (*batch, hq, lq, lk)
        try:
            fits = attn_mask.dim() <= len(target) and _broadcast(attn_mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise InputError(f"{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                             f"to {target} (..., Hq, Lq, Lk)")
        mask = _mask_4d(attn_mask, batch)
    dropout_p = check_probability(fn, "dropout_p", dropout_p)
    scale = check_scale(fn, scale)
    check_bool(fn, "deterministic", deterministic)
    if e == 0:  # every score is 0 (torch's result: softmax of the mask alone); one zero column stands in
        q, k, scale = F.pad(q, (0, 1)), F.pad(k, (0, 1)), 1.0
    if ev == 0:
        v = F.pad(v, (0, 1))
    out = ops.attention.scaled_dot_product_attention(
        q, k, v, mask, dropout_p, is_causal, scale, gqa, causal_alignment, deterministic)
    if ev == 0:
        out = out[..., :0]
    if query.dim() == key.dim() == value.dim() == 2:
        return out.reshape(lq, ev)
    return out.reshape(*batch, hq, lq, ev) if len(batch) != 1 else out


_FAST_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32))


def _ordinary_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal_alignment,
                        deterministic) -> bool:
    """Whether a call is the common case that needs none of the checks' conversions: plain 4-D
    (B, H, L, E) tensors of one kernel dtype and device with equal batch and head dims, no mask or a
    4-D one that broadcasts, Python float/bool arguments, the defaults for the rest. Such a call is
    valid as it is; every other call (including every invalid one) takes the full checks, which give
    the errors. A per-call cost on small problems: these few comparisons take ~1 us, the checks ~15."""
    if not (type(query) is Tensor and type(key) is Tensor and type(value) is Tensor
            and (is_causal is False or is_causal is True) and enable_gqa is False and deterministic is False
            and causal_alignment == "top_left" and type(dropout_p) is float and 0.0 <= dropout_p < 1.0
            and (scale is None or (type(scale) is float and math.isfinite(scale)))):
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    (b, h, lq, e), (bk, hk, lk, ek), (bv, hv, lv, ev) = query.shape, key.shape, value.shape
    dtype, device = query.dtype, query.device
    if not (b == bk == bv and h == hk == hv and lk == lv and e == ek and 0 < e <= MAX_HEAD_DIM
            and 0 < ev <= MAX_HEAD_DIM and dtype in _FAST_DTYPES and key.dtype == dtype == value.dtype
            and key.device == device == value.device):
        return False
    if attn_mask is None:
        return True
    if type(attn_mask) is not Tensor or attn_mask.dim() != 4 or attn_mask.device != device:
        return False
    if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
        return False
    return all(m == 1 or m == t for m, t in zip(attn_mask.shape, (b, h, lq, lk)))


try:
    from torch.nn.attention.bias import CausalBias as _CausalBias
except ImportError:  # torch without attention biases
    _CausalBias = None


def _is_causal_bias(mask) -> bool:
    return _CausalBias is not None and isinstance(mask, _CausalBias)


def _from_causal_bias(fn: str, bias, is_causal: bool, causal_alignment: str, lq: int, lk: int):
    """(attn_mask, is_causal, causal_alignment) for one of torch's CausalBias masks: a causal flag,
    never a tensor to read (its storage holds nothing)."""
    from torch.nn.attention.bias import CausalVariant

    if is_causal:
        raise InputError(f"{fn}: a CausalBias attn_mask is itself the causal mask; do not set is_causal=True "
                         "too (as torch)")
    if causal_alignment != "top_left":
        raise InputError(f"{fn}: a CausalBias attn_mask brings its own alignment; leave causal_alignment "
                         f"at 'top_left', got {causal_alignment!r}")
    if (bias.seq_len_q, bias.seq_len_kv) != (lq, lk):
        raise InputError(f"{fn}: the CausalBias attn_mask is for (Lq, Lk) = ({bias.seq_len_q}, {bias.seq_len_kv}), "
                         f"but query and key have ({lq}, {lk})")
    lower_right = bias.variant == CausalVariant.LOWER_RIGHT
    return None, True, "lower_right" if lower_right else "top_left"


def _broadcast_qkv(fn: str, query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """query, key, value as 4-D (B, H, L, E) views, with torch's broadcasting of every dim before the
    last two (any number of batch dims, 2-D inputs, size-1 batch or head dims of either side); GQA
    keeps key/value's own heads. Returns (q, k, v, batch shape before the heads, gqa)."""
    nd = max(query.dim(), key.dim(), value.dim(), 3)

    def padded(t: Tensor) -> Tensor:
        return t[(None,) * (nd - t.dim())]

    q, k, v = padded(query), padded(key), padded(value)
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    gqa = enable_gqa and hq != hk and hk == hv and hk > 0 and hq % hk == 0 and hk != 1
    if gqa:
        hq_out, hkv = hq, hk
    else:
        if enable_gqa and hq != hk and hk == hv and (hk == 0 or hq % hk != 0):
            raise InputError(f"{fn}: with enable_gqa, query heads ({hq}) must be a multiple of "
                             f"key/value heads ({hk})")
        try:
            hq_out = hkv = _broadcast((hq,), (hk,), (hv,))[0]
        except RuntimeError:
            hint = "; for grouped-query attention set enable_gqa=True" if hk == hv and hk and hq % hk == 0 else ""
            raise InputError(f"{fn}: query has {hq} heads but key has {hk} and value {hv}: they must be equal "
                             f"or 1 (broadcast){hint}") from None
    try:
        batch = _broadcast(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise InputError(f"{fn}: batch dims do not broadcast: query {tuple(query.shape[:-3])}, key "
                         f"{tuple(key.shape[:-3])}, value {tuple(value.shape[:-3])}") from None
    q, k, v = (t if t.shape[:-2] == (*batch, h) else t.expand(*batch, h, *t.shape[-2:])
               for t, h in ((q, hq_out), (k, hkv), (v, hkv)))
    if len(batch) != 1:  # one batch dim (a view when the dims merge; a copy only where they can't)
        q, k, v = (t.reshape(math.prod(batch), *t.shape[-3:]) for t in (q, k, v))
    if query.dim() == 2 and key.dim() == 2 and value.dim() == 2:
        batch = ()
    return q, k, v, batch, gqa


def _broadcast(*shapes) -> Tuple[int, ...]:
    """torch.broadcast_shapes of a few short shapes (a tuple), raising RuntimeError as it does; in
    Python, as the call's checks are a per-call cost on small problems (torch's takes ~20 us)."""
    n = max(len(shape) for shape in shapes)
    out = []
    for i in range(n):
        sizes = {shape[len(shape) - n + i] for shape in shapes if len(shape) - n + i >= 0}
        big = sizes - {1}
        if len(big) > 1:
            raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
        out.append(big.pop() if big else 1)
    return tuple(out)


def _mask_4d(mask: Tensor, batch: Tuple[int, ...]) -> Tensor:
    """A mask broadcastable to (*batch, H, Lq, Lk) as a 4-D one broadcastable to (B, H, Lq, Lk) with B
    the batch dims merged: un-expanded (the kernels broadcast through strides) where it allows."""
    if len(batch) <= 1:
        return mask[(None,) * (4 - mask.dim())] if mask.dim() < 4 else mask
    mask = mask[(None,) * (len(batch) + 3 - mask.dim())]
    lead = mask.shape[:len(batch)]
    if all(size == 1 for size in lead):
        return mask.reshape(1, *mask.shape[len(batch):])
    return mask.expand(*batch, *mask.shape[len(batch):]).reshape(math.prod(batch), *mask.shape[len(batch):])


def _check_fc(fn: str, name: str, w: Tensor, out_features: Optional[int], in_features: int) -> int:
    """A 1x1-conv (out, in, 1, 1) or linear (out, in) weight; returns ``out``."""
    check_tensor(fn, name, w, ndims=(2, 4))
    if w.dim() == 4 and tuple(w.shape[2:]) != (1, 1):
        raise InputError(f"{fn}: {name} must be a 1x1 conv weight (out, in, 1, 1), got {tuple(w.shape)}")
    out = out_features if out_features is not None else w.shape[0]
    if out < 1:
        raise InputError(f"{fn}: {name} must have at least one output channel (dim 0), got shape {tuple(w.shape)}")
    if w.shape[0] != out or w.shape[1] != in_features:
        raise InputError(f"{fn}: {name} must have shape ({out}, {in_features}) or "
                         f"({out}, {in_features}, 1, 1), got {tuple(w.shape)}")
    return out


def _check_image(fn: str, x, *, max_pool: bool = False) -> Tensor:
    """x is (N, C, H, W) with C >= 1 (and H * W >= 1 where the op takes a max over H, W)."""
    check_tensor(fn, "x", x, ndims=(4,), legend="(N, C, H, W)")
    if x.shape[1] < 1:
        raise InputError(f"{fn}: x must have at least one channel (dim 1), got shape {tuple(x.shape)}")
    if max_pool and x.shape[2] * x.shape[3] < 1:
        raise InputError(f"{fn}: x must have H * W >= 1 (the op takes a max over H, W), got shape {tuple(x.shape)}")
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
    if norm is None and _ordinary_squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate,
                                                 pool):
        return ops.squeeze_excite.squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate,
                                                 pool, None)
    fn = "squeeze_excite"
    _check_image(fn, x, max_pool=pool == "avgmax")
    c = x.shape[1]
    cr = _check_fc(fn, "fc1_weight", fc1_weight, None if fc2_weight is not None else c, c)
    check_shape(fn, "fc1_bias", fc1_bias, [(cr,)])
    if fc2_weight is not None:
        _check_fc(fn, "fc2_weight", fc2_weight, c, cr)
    elif fc2_bias is not None:
        raise InputError(f"{fn}: fc2_bias was given without fc2_weight")
    check_shape(fn, "fc2_bias", fc2_bias, [(c,)])
    check_same(fn, ("x", x), ("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
               ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias))
    check_choice(fn, "activation", activation, tuple(ACTIVATIONS))
    check_choice(fn, "gate", gate, tuple(GATES))
    check_choice(fn, "pool", pool, POOLS)
    if norm is not None:
        if not callable(norm):
            raise InputTypeError(f"{fn}: norm must be a callable (a norm layer), got {type(norm).__name__}")
        if fc2_weight is None:
            raise InputError(f"{fn}: norm needs a hidden layer (fc2_weight); a single fc has none")
    return ops.squeeze_excite.squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                             activation, gate, pool, norm)


def _ordinary_squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, pool) -> bool:
    """Whether an SE call without a norm is valid as it is, by a few comparisons (~2 us against the
    checks' ~10: a per-call cost on small maps); any other call, every invalid one included, takes the
    full checks, which give the errors."""
    if not (type(x) is Tensor and isinstance(fc1_weight, Tensor) and x.dim() == 4 and x.dtype in _FAST_DTYPES
            and type(activation) is str and activation in ACTIVATIONS and type(gate) is str and gate in GATES
            and type(pool) is str and pool in POOLS and fc1_weight.dim() in (2, 4)):
        return False
    n, c, h, w = x.shape
    if c < 1 or h * w < 1:
        return False
    dtype, device = x.dtype, x.device
    cr = fc1_weight.shape[0]
    if fc2_weight is None:
        fc_shapes = ((c, c),) if fc2_bias is None else ()
    elif isinstance(fc2_weight, Tensor):
        fc_shapes = ((cr, c), (c, cr))
    else:
        return False
    for weight, shape in zip((fc1_weight, fc2_weight), fc_shapes):
        if weight.dtype != dtype or weight.device != device or weight.shape[:2] != shape or cr < 1:
            return False
        if weight.dim() != 2 and (weight.dim() != 4 or weight.shape[2] != 1 or weight.shape[3] != 1):
            return False
    if len(fc_shapes) == 0:
        return False
    for bias, size in ((fc1_bias, cr), (fc2_bias, c)):
        if bias is not None and not (isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == size
                                     and bias.dtype == dtype and bias.device == device):
            return False
    return True


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
        raise InputError(f"{fn}: conv_weight must have shape (1, 1, k) or (k,) with k odd, "
                         f"got {tuple(conv_weight.shape)}")
    check_same(fn, ("x", x), ("conv_weight", conv_weight))
    check_choice(fn, "gate", gate, tuple(GATES))
    return ops.squeeze_excite.efficient_channel_attention(x, conv_weight, gate)


def _ordinary_cbam(x, fc1_weight, fc2_weight, conv_weight, fc1_bias, fc2_bias, conv_bias, activation, gate,
                   channel_gate, light, spatial_order, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                   bn_training, bn_momentum, bn_eps) -> bool:
    """Whether a CBAM call is valid as it is, by a few comparisons (as _ordinary_squeeze_excite; the
    full checks give the errors of every other call)."""
    if not (type(x) is Tensor and x.dim() == 4 and x.dtype in _FAST_DTYPES and (light is True or light is False)
            and (bn_training is True or bn_training is False) and type(activation) is str and activation in ACTIVATIONS
            and type(gate) is str and gate in GATES and type(spatial_order) is str and spatial_order in SPATIAL_ORDERS
            and (channel_gate is None or (type(channel_gate) is str and channel_gate in GATES))
            and type(bn_momentum) is float and 0.0 <= bn_momentum <= 1.0
            and type(bn_eps) is float and math.isfinite(bn_eps) and bn_eps >= 0.0):
        return False
    n, c, h, w = x.shape
    if c < 1 or h * w < 1 or not (isinstance(fc1_weight, Tensor) and isinstance(fc2_weight, Tensor)
                                  and isinstance(conv_weight, Tensor)):
        return False
    dtype, device = x.dtype, x.device
    cr = fc1_weight.shape[0] if fc1_weight.dim() in (2, 4) else 0
    for weight, shape in ((fc1_weight, (cr, c)), (fc2_weight, (c, cr))):
        if weight.dtype != dtype or weight.device != device or weight.shape[:2] != shape or cr < 1:
            return False
        if weight.dim() != 2 and (weight.dim() != 4 or weight.shape[2] != 1 or weight.shape[3] != 1):
            return False
    k = conv_weight.shape[-1]
    if (conv_weight.dtype != dtype or conv_weight.device != device or k % 2 == 0
            or tuple(conv_weight.shape) != (1, 1 if light else 2, k, k)):
        return False
    for bias, size in ((fc1_bias, cr), (fc2_bias, c), (conv_bias, 1)):
        if bias is not None and not (isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == size
                                     and bias.dtype == dtype and bias.device == device):
            return False
    state = (bn_weight, bn_bias, bn_running_mean, bn_running_var)
    for t in state:
        if t is not None and not (isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == 1
                                  and t.dtype in FLOAT_DTYPES and t.device == device):
            return False
    if (bn_running_mean is None) != (bn_running_var is None):
        return False
    if bn_running_mean is None and bn_weight is not None and not bn_training:
        return False
    return not (bn_training and (bn_weight is not None or bn_running_mean is not None) and n * h * w <= 1)


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
    if _ordinary_cbam(x, fc1_weight, fc2_weight, conv_weight, fc1_bias, fc2_bias, conv_bias, activation, gate,
                      channel_gate, light, spatial_order, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                      bn_training, bn_momentum, bn_eps):
        return ops.cbam.cbam(
            x, fc1_weight, fc2_weight, conv_weight, fc1_bias, fc2_bias, conv_bias, activation=activation, gate=gate,
            channel_gate=channel_gate, light=light, spatial_order=spatial_order, bn_weight=bn_weight, bn_bias=bn_bias,
            bn_running_mean=bn_running_mean, bn_running_var=bn_running_var, bn_training=bn_training,
            bn_momentum=float(bn_momentum), bn_eps=float(bn_eps))
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
        raise InputError(f"{fn}: conv_weight must have shape (1, {maps}, k, k) with k odd"
                         f"{' (light=True)' if light else ''}, got {tuple(conv_weight.shape)}")
    check_shape(fn, "conv_bias", conv_bias, [(1,)])
    bn = (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("bn_running_mean", bn_running_mean),
          ("bn_running_var", bn_running_var))
    for name, t in bn:
        if t is not None:
            check_tensor(fn, name, t, dtypes=FLOAT_DTYPES)
            check_shape(fn, name, t, [(1,)])
    if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float)) or not 0.0 <= bn_momentum <= 1.0:
        raise InputError(f"{fn}: bn_momentum must be a float in [0, 1] (BatchNorm's momentum=None is not "
                         f"supported), got {bn_momentum!r}")
    bn_eps = check_nonnegative_float(fn, "bn_eps", bn_eps)
    if (bn_running_mean is None) != (bn_running_var is None):
        raise InputError(f"{fn}: give both bn_running_mean and bn_running_var, or neither")
    if bn_running_mean is None and bn_weight is not None and not bn_training:
        raise InputError(f"{fn}: BatchNorm in eval mode (bn_training=False) needs bn_running_mean "
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
        raise InputError(f"{fn}: BatchNorm in training mode needs more than one value per channel: "
                         f"x {tuple(x.shape)} gives N * H * W = {x.shape[0] * x.shape[2] * x.shape[3]}")
    check_choice(fn, "spatial_order", spatial_order, SPATIAL_ORDERS)
    return ops.cbam.cbam(
        x, fc1_weight, fc2_weight, conv_weight, fc1_bias, fc2_bias, conv_bias,
        activation=activation, gate=gate, channel_gate=channel_gate, light=light,
        spatial_order=spatial_order, bn_weight=bn_weight, bn_bias=bn_bias,
        bn_running_mean=bn_running_mean, bn_running_var=bn_running_var, bn_training=bn_training,
        bn_momentum=bn_momentum, bn_eps=bn_eps)
