"""Fused squeeze-and-excitation: y = x * gate(fc2(act(fc1(pool_hw(x))))), forward and backward.

Passes over x (N, C, H, W), NCHW or channels_last, read through strides so each layout is read
along its contiguous dimension:

* forward: ``_se_pool`` (per sample and channel: fp32 sum, and max for timm's add_maxpool), the
  MLP as two launches of ``_se_fc`` (fc1 + activation, fc2 + gate; a tiny GEMM with a fused bias and
  activation epilogue), and ``_se_scale`` (y = x * s). One read of x to pool, one read and one write
  to scale.
* backward: ``_se_bwd_reduce`` (g = sum_hw dy * x per sample and channel: the gradient of the gate
  output s; with max-pooling also the number of positions holding the max), the MLP backward (in
  the op layer, on (N, C) tensors), and ``_se_bwd_dx`` (dx = dy * s + dz / HW, plus the max-pool
  share). Two reads of dy, one of x, one write of dx.

ECA (timm's EcaModule) shares the pool and scale passes (``squeeze_excite_scale``) with ``_eca_conv``
(the 1-D convolution across channels plus the gate) in place of the MLP, and the same backward
passes.

The launchers run the passes over groups of samples whose x fits in a share of the L2 cache, so the
second read of x (and of dy) comes from L2 rather than HBM (SAMPLE_GROUP_BYTES).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .aot import AOTCase, signature_of, unit_strides
from .interpreter import bf16_rne, needs_bf16_rne

#: Activation and gate codes (constexpr ACT of _se_fc); names as attn_fast.reference.ACTIVATIONS/GATES.
ACT_CODES: Dict[str, int] = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5,
                             "hardswish": 6, "sigmoid": 7, "hardsigmoid": 8}

#: Bytes of x per sample group: the passes run group by group so that a group's x (then dy) is still
#: in L2 for the second pass over it (H100: 50 MiB of L2; half of it leaves room for the output and the weights).
SAMPLE_GROUP_BYTES = 24 << 20

#: Tiles of the passes over x: (BLOCK_C, BLOCK_HW, num_warps), wide along the contiguous dimension:
#: H*W for NCHW, C for channels_last.
NCHW_TILE = (16, 128, 4)
NHWC_TILE = (64, 32, 4)
#: The MLP's GEMM tile (BLOCK_M samples, BLOCK_N outputs, BLOCK_K inputs, num_warps).
FC_TILE = (16, 64, 32, 4)
#: Channels per program of ECA's 1-D convolution.
ECA_BLOCK_C = 128


@triton.jit
def _activation(x, ACT: tl.constexpr):
    """One of ACT_CODES, elementwise on fp32, as torch defines it (NaN in, NaN out: the clamps
    propagate NaN as torch's do)."""
    if ACT == 1:
        y = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        y = tl.minimum(tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 3:
        y = x * tl.sigmoid(x)
    elif ACT == 4:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 5:  # tanh(u) = 2 * sigmoid(2u) - 1
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * u)
    elif ACT == 6:
        y = x * tl.minimum(tl.maximum(x + 3.0, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0,
                       propagate_nan=tl.PropagateNan.ALL) / 6.0
    elif ACT == 7:
        y = tl.sigmoid(x)
    elif ACT == 8:
        y = tl.minimum(tl.maximum(x + 3.0, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0,
                       propagate_nan=tl.PropagateNan.ALL) / 6.0
    else:
        y = x
    return y


# One program pools BLOCK_C channels of one sample over all H*W positions: reads BLOCK_C * HW
# elements of x once, writes BLOCK_C fp32 pooled values (and the maxima with WITH_MAX; Z holds
# 0.5 * mean + 0.5 * max then, unless BLEND=False).
@triton.jit
def _se_pool(
    X, Z, Zmax,                        # Z, Zmax (N, C) fp32
    C, HW, stride_xn, stride_xc, stride_xhw, inv_hw,
    WITH_MAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLEND: tl.constexpr = True,
):
    n = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    hws = tl.arange(0, BLOCK_HW)
    c_ok = cs < C
    base = X + n * stride_xn + cs[:, None] * stride_xc
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    mx = tl.full([BLOCK_C, BLOCK_HW], float("-inf"), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + hws
        ok = c_ok[:, None] & (hw[None, :] < HW)
        x = tl.load(base + hw[None, :] * stride_xhw, mask=ok, other=0.0).to(tl.float32)
        acc += x
        if WITH_MAX:
            mx = tl.maximum(mx, tl.where(ok, x, float("-inf")))
    mean = tl.sum(acc, 1) * inv_hw
    if WITH_MAX:
        m = tl.max(mx, 1)
        tl.store(Zmax + n * C + cs, m, mask=c_ok)
        if BLEND:  # timm's add_maxpool; CBAM (BLEND=False) keeps the mean and the max apart
            mean = 0.5 * mean + 0.5 * m
    tl.store(Z + n * C + cs, mean, mask=c_ok)


# One program computes a BLOCK_M x BLOCK_N tile of Y = act(X W^T + b) (and of its pre-activation P):
# X (M, K) fp32 rows (the pooled vectors or the hidden layer), W (N, K) the layer's weight in any
# dtype and strides. Reads BLOCK_M x K of X and BLOCK_N x K of W; writes two fp32 tiles.
@triton.jit
def _se_fc(
    X, W, B, P, Y,                     # X (M, K), P, Y (M, N) fp32 contiguous; B (N,) or unused
    M, N, K, stride_wn, stride_wk,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(X + rows[:, None].to(tl.int64) * K + k[None, :],
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        wT = tl.load(W + cols[None, :] * stride_wn + k[:, None] * stride_wk,
                     mask=(cols[None, :] < N) & (k[:, None] < K), other=0.0).to(tl.float32)
        acc += tl.dot(x, wT, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(P + offs, acc, mask=ok)
    tl.store(Y + offs, _activation(acc, ACT), mask=ok)


# One program computes BLOCK_C gates of one sample for ECA: pre = sum_j w[j] * z[c + j - (TAPS-1)/2]
# (zero padded), s = act(pre). Reads BLOCK_C + TAPS - 1 pooled values and the TAPS weights; writes
# two fp32 vectors.
@triton.jit
def _eca_conv(Z, W, P, S, C, TAPS: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(TAPS):
        src = cs + (j - (TAPS - 1) // 2)
        z = tl.load(Z + n * C + src, mask=(src >= 0) & (src < C), other=0.0)
        acc += tl.load(W + j).to(tl.float32) * z
    tl.store(P + n * C + cs, acc, mask=cs < C)
    tl.store(S + n * C + cs, _activation(acc, ACT), mask=cs < C)


# One program scales a BLOCK_C x BLOCK_HW tile of one sample: y = x * s[n, c]. Reads the tile and
# BLOCK_C gate values, writes the tile.
@triton.jit
def _se_scale(
    X, S, Y,                           # S (N, C) fp32; Y strided like X
    C, HW, stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BF16_RNE: tl.constexpr = False,
):
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    ok = (cs[:, None] < C) & (hw[None, :] < HW)
    s = tl.load(S + n * C + cs, mask=cs < C, other=0.0)
    x = tl.load(X + n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=ok, other=0.0)
    y = x.to(tl.float32) * s[:, None]
    if BF16_RNE:
        y = bf16_rne(y)
    tl.store(Y + n * stride_yn + cs[:, None] * stride_yc + hw[None, :] * stride_yhw, y.to(Y.dtype.element_ty),
             mask=ok)


# One program reduces BLOCK_C channels of one sample over H*W: G = sum(dy * x) (the gradient of the
# gate output), and with WITH_MAX the count of positions equal to the channel's max. Reads the
# dy and x tiles once; writes BLOCK_C fp32 values (two with WITH_MAX).
@triton.jit
def _se_bwd_reduce(
    DY, X, Zmax, G, Cnt,               # Zmax, G, Cnt (N, C) fp32
    C, HW, stride_dn, stride_dc, stride_dhw, stride_xn, stride_xc, stride_xhw,
    WITH_MAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    hws = tl.arange(0, BLOCK_HW)
    c_ok = cs < C
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    if WITH_MAX:
        m = tl.load(Zmax + n * C + cs, mask=c_ok, other=0.0)
    for start in range(0, HW, BLOCK_HW):
        hw = start + hws
        ok = c_ok[:, None] & (hw[None, :] < HW)
        x = tl.load(X + n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=ok,
                    other=0.0).to(tl.float32)
        dy = tl.load(DY + n * stride_dn + cs[:, None] * stride_dc + hw[None, :] * stride_dhw, mask=ok,
                     other=0.0).to(tl.float32)
        acc += dy * x
        if WITH_MAX:
            cnt += tl.where(ok & (x == m[:, None]), 1.0, 0.0)
    tl.store(G + n * C + cs, tl.sum(acc, 1), mask=c_ok)
    if WITH_MAX:
        tl.store(Cnt + n * C + cs, tl.sum(cnt, 1), mask=c_ok)


# One program writes a BLOCK_C x BLOCK_HW tile of dx = dy * s + dz_avg (+ dz_max / count where x is
# the channel's max): reads the dy tile (and the x tile with WITH_MAX), writes the dx tile. With
# HAS_DY=False (the pooling's own backward, when the gate is applied by a separate op) dx has no
# dy * s term and DY is not read.
@triton.jit
def _se_bwd_dx(
    DY, X, S, DZavg, DZmax, Zmax,      # S, DZavg, DZmax, Zmax (N, C) fp32; DZavg already / HW
    DX,
    C, HW, stride_dn, stride_dc, stride_dhw, stride_xn, stride_xc, stride_xhw,
    stride_gn, stride_gc, stride_ghw,  # DX
    WITH_MAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BF16_RNE: tl.constexpr = False,
    HAS_DY: tl.constexpr = True,
):
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = cs < C
    ok = c_ok[:, None] & (hw[None, :] < HW)
    dza = tl.load(DZavg + n * C + cs, mask=c_ok, other=0.0)
    dx = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32) + dza[:, None]
    if HAS_DY:
        s = tl.load(S + n * C + cs, mask=c_ok, other=0.0)
        dy = tl.load(DY + n * stride_dn + cs[:, None] * stride_dc + hw[None, :] * stride_dhw, mask=ok,
                     other=0.0).to(tl.float32)
        dx += dy * s[:, None]
    if WITH_MAX:
        dzm = tl.load(DZmax + n * C + cs, mask=c_ok, other=0.0)  # already / count
        m = tl.load(Zmax + n * C + cs, mask=c_ok, other=0.0)
        x = tl.load(X + n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=ok,
                    other=0.0).to(tl.float32)
        dx += tl.where(x == m[:, None], dzm[:, None], 0.0)
    if BF16_RNE:
        dx = bf16_rne(dx)
    tl.store(DX + n * stride_gn + cs[:, None] * stride_gc + hw[None, :] * stride_ghw, dx.to(DX.dtype.element_ty),
             mask=ok)


def as_nc_hw(x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int], bool]:
    """(x, (stride_n, stride_c, stride_hw), channels_last) for an (N, C, H, W) tensor whose H and W
    flatten to one index: NCHW-contiguous or channels_last-contiguous. Any other layout is copied
    to NCHW first (the one copy the op cannot avoid)."""
    n, c, h, w = x.shape
    if x.is_contiguous():
        return x, (c * h * w, h * w, 1), False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, (h * w * c, 1, c), True
    x = x.contiguous()
    return x, (c * h * w, h * w, 1), False


def _tile(channels_last: bool) -> Tuple[int, int, int]:
    return NHWC_TILE if channels_last else NCHW_TILE


def _groups(n: int, bytes_per_sample: int):
    """Sample ranges [lo, hi) whose x fits in SAMPLE_GROUP_BYTES (at least one sample each)."""
    step = max(1, SAMPLE_GROUP_BYTES // max(1, bytes_per_sample))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def fc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str
       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pre, act(pre)) with pre = x @ weight^T + bias; x (M, K) fp32, weight (N, K) (or a 1x1 conv
    weight (N, K, 1, 1)) in any float dtype; fp32 results (M, N)."""
    weight = weight.reshape(weight.shape[0], -1).contiguous()  # small; keeps its offsets in int32
    bias = None if bias is None else bias.contiguous()         # the kernel reads B + col
    m, k = x.shape
    nout = weight.shape[0]
    pre = torch.empty((m, nout), device=x.device, dtype=torch.float32)
    y = torch.empty((m, nout), device=x.device, dtype=torch.float32)
    bm, bn, bk, warps = FC_TILE
    _se_fc[(triton.cdiv(m, bm), triton.cdiv(nout, bn))](
        x.contiguous(), weight, bias if bias is not None else x, pre, y, m, nout, k, *weight.stride(),
        ACT=ACT_CODES[act], HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return pre, y


def se_forward(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
               fc2_weight: Optional[torch.Tensor], fc2_bias: Optional[torch.Tensor], activation: str,
               gate: str, pool: str) -> Dict[str, torch.Tensor]:
    """Run the SE forward. Returns y (like x, in x's memory format) and what the backward needs:
    z (N, C) pooled, zmax (N, C) with pool="avgmax" (else empty), pre1/h (N, Cr) fc1's output before
    and after the activation (empty with a single fc), pre2 (N, C) the gate's input, s (N, C) the gate;
    all fp32."""
    def excite(zg):
        if fc2_weight is None:
            pre2, s = fc(zg, fc1_weight, fc1_bias, gate)
            return dict(pre2=pre2, s=s)
        pre1, h = fc(zg, fc1_weight, fc1_bias, activation)
        pre2, s = fc(h, fc2_weight, fc2_bias, gate)
        return dict(pre1=pre1, h=h, pre2=pre2, s=s)

    return squeeze_excite_scale(x, pool, excite, ("pre1", "h", "pre2", "s"))


def eca_forward(x: torch.Tensor, conv_weight: torch.Tensor, gate: str) -> Dict[str, torch.Tensor]:
    """Run the ECA forward: y = x * gate(conv1d_k(mean_hw(x))) across channels (zero padding
    (k - 1) // 2, no bias). Returns y, z (N, C) pooled, pre (N, C) the gate's input, s (N, C)."""
    k = conv_weight.numel()
    w = conv_weight.reshape(k).contiguous()  # the kernel reads W + j

    def excite(zg):
        m, c = zg.shape
        pre = torch.empty((m, c), device=x.device, dtype=torch.float32)
        s = torch.empty((m, c), device=x.device, dtype=torch.float32)
        _eca_conv[(triton.cdiv(c, ECA_BLOCK_C), m)](zg, w, pre, s, c, TAPS=k, ACT=ACT_CODES[gate],
                                                    BLOCK_C=ECA_BLOCK_C)
        return dict(pre=pre, s=s)

    out = squeeze_excite_scale(x, "avg", excite, ("pre", "s"))
    del out["zmax"]
    return out


def _pool_into(xg, strides, z, zmax, c: int, hw: int, tile, blend: bool = True) -> None:
    """Pool the samples of ``xg`` into the rows of z (and zmax when it is not empty; z then holds
    0.5 * mean + 0.5 * max unless ``blend`` is False)."""
    bc, bhw, warps = tile
    with_max = zmax.numel() > 0
    _se_pool[(triton.cdiv(c, bc), xg.shape[0])](
        xg, z, zmax if with_max else z, c, hw, *strides, 1.0 / hw,
        WITH_MAX=with_max, BLOCK_C=bc, BLOCK_HW=bhw, BLEND=blend, num_warps=warps)


def _scale_into(xg, strides, s, yg, c: int, hw: int, tile) -> None:
    """yg = xg * s (s: fp32 rows, one per sample of xg); yg strided like xg."""
    bc, bhw, warps = tile
    _se_scale[(triton.cdiv(hw, bhw), triton.cdiv(c, bc), xg.shape[0])](
        xg, s, yg, c, hw, *strides, *strides, BLOCK_C=bc, BLOCK_HW=bhw,
        BF16_RNE=needs_bf16_rne(xg.dtype), num_warps=warps)


def squeeze_excite_scale(x: torch.Tensor, pool: str, excite, keys) -> Dict[str, torch.Tensor]:
    """The passes every channel-attention op shares: pool x per sample and channel, ``excite`` the
    pooled (samples, C) fp32 rows into a dict holding the gate ``s`` (and what the backward needs, under
    ``keys``), then y = x * s. Runs sample group by sample group (SAMPLE_GROUP_BYTES)."""
    xs, strides, cl = as_nc_hw(x)
    n, c, hh, ww = x.shape
    hw = hh * ww
    y = torch.empty_like(xs)  # same strides as xs (memory format preserved)
    z = torch.empty((n, c), device=x.device, dtype=torch.float32)
    zmax = torch.empty((n, c) if pool == "avgmax" else (0,), device=x.device, dtype=torch.float32)
    out = dict(y=y, z=z, zmax=zmax)
    parts: Dict[str, list] = {key: [] for key in keys}
    tile = _tile(cl)
    for lo, hi in _groups(n, c * hw * x.element_size()) if y.numel() else ():
        _pool_into(xs[lo:hi], strides, z[lo:], zmax[lo:], c, hw, tile)
        got = excite(z[lo:hi])
        _scale_into(xs[lo:hi], strides, got["s"], y[lo:hi], c, hw, tile)
        for key in keys:
            if key in got:
                parts[key].append(got[key])
    for key, got in parts.items():  # a fresh empty for each missing one: op outputs must not alias
        out[key] = (got[0] if len(got) == 1 else torch.cat(got)) if got else \
            x.new_empty((0,), dtype=torch.float32)
    return out


def channel_pool(x: torch.Tensor, pool: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(z, zmax): the pooled (N, C) fp32 rows of x (mean, or 0.5 * mean + 0.5 * max with
    pool="avgmax") and the channel maxima (empty unless "avgmax"). One read of x. For the SE layers
    whose excitation runs in PyTorch (a norm layer inside the MLP); the fused path is se_forward."""
    xs, strides, cl = as_nc_hw(x)
    n, c, hh, ww = x.shape
    z = torch.empty((n, c), device=x.device, dtype=torch.float32)
    zmax = torch.empty((n, c) if pool == "avgmax" else (0,), device=x.device, dtype=torch.float32)
    if z.numel() and hh * ww:
        _pool_into(xs, strides, z, zmax, c, hh * ww, _tile(cl))
    elif z.numel():  # no positions: the mean of nothing, as torch defines it
        z.fill_(float("nan"))
        zmax.fill_(float("nan"))
    return z, zmax


def channel_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = x * s[:, :, None, None] in x's memory format (s (N, C) fp32). One read and one write of x."""
    xs, strides, cl = as_nc_hw(x)
    n, c, hh, ww = x.shape
    y = torch.empty_like(xs)
    if y.numel():
        _scale_into(xs, strides, s.contiguous(), y, c, hh * ww, _tile(cl))
    return y


def se_reduce_grad(dy: torch.Tensor, x: torch.Tensor, zmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(g, count): g = sum_hw(dy * x) (N, C) fp32, the gradient of the gate output; count (N, C) the
    positions equal to the channel max when ``zmax`` is not empty (else empty)."""
    xs, (sn, sc, shw), cl = as_nc_hw(x)
    dys, dstr, _ = _like(dy, cl)
    n, c, hh, ww = x.shape
    hw = hh * ww
    with_max = zmax.numel() > 0
    g = torch.empty((n, c), device=x.device, dtype=torch.float32)
    cnt = torch.empty((n, c) if with_max else (0,), device=x.device, dtype=torch.float32)
    if g.numel() == 0:
        return g, cnt
    bc, bhw, warps = _tile(cl)
    _se_bwd_reduce[(triton.cdiv(c, bc), n)](
        dys, xs, zmax if with_max else g, g, cnt if with_max else g, c, hw, *dstr, sn, sc, shw,
        WITH_MAX=with_max, BLOCK_C=bc, BLOCK_HW=bhw, num_warps=warps)
    return g, cnt


def se_grad_input(dy: Optional[torch.Tensor], x: torch.Tensor, s: torch.Tensor, dz_avg: torch.Tensor,
                  dz_max: torch.Tensor, zmax: torch.Tensor) -> torch.Tensor:
    """dx = dy * s + dz_avg (broadcast over H, W) + dz_max where x equals its channel max; the (N, C)
    inputs are fp32 (dz_avg already divided by H*W, dz_max by the count; both empty-able: dz_max
    and zmax empty without max pooling). dx has x's memory format. ``dy=None`` drops the dy * s
    term (the backward of channel_pool alone; s is then not read)."""
    xs, (sn, sc, shw), cl = as_nc_hw(x)
    dys, dstr, _ = _like(dy, cl) if dy is not None else (xs, (sn, sc, shw), cl)
    n, c, hh, ww = x.shape
    hw = hh * ww
    with_max = zmax.numel() > 0
    dx = torch.empty_like(xs)
    if dx.numel() == 0:
        return dx
    bc, bhw, warps = _tile(cl)
    _se_bwd_dx[(triton.cdiv(hw, bhw), triton.cdiv(c, bc), n)](
        dys, xs, s, dz_avg, dz_max if with_max else s, zmax if with_max else s, dx,
        c, hw, *dstr, sn, sc, shw, sn, sc, shw,
        WITH_MAX=with_max, BLOCK_C=bc, BLOCK_HW=bhw, BF16_RNE=needs_bf16_rne(x.dtype), HAS_DY=dy is not None,
        num_warps=warps)
    return dx


def _like(t: torch.Tensor, channels_last: bool) -> Tuple[torch.Tensor, Tuple[int, int, int], bool]:
    """``t`` (an upstream gradient) and its (stride_n, stride_c, stride_hw): read in place when its H
    and W flatten to one index (NCHW or channels_last, whichever x has: the kernels take its strides
    apart from x's), else copied to x's layout."""
    n, c, h, w = t.shape
    if t.is_contiguous():
        return t, (c * h * w, h * w, 1), channels_last
    if t.is_contiguous(memory_format=torch.channels_last):
        return t, (h * w * c, 1, c), channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = t.contiguous(memory_format=fmt)
    return t, ((h * w * c, 1, c) if channels_last else (c * h * w, h * w, 1)), channels_last


def _aot_cases():
    """Every kernel in every tile it is launched with, for fp16, bf16 and fp32 x, NCHW (H*W stride 1)
    and channels_last (C stride 1): the unit stride is compiled in as the launch specialises it."""
    cases = []
    dtypes = ("fp16", "bf16", "fp32")
    for tname in dtypes:
        t = f"*{tname}"
        for layout, (bc, bhw, warps) in (("nchw", NCHW_TILE), ("nhwc", NHWC_TILE)):
            unit = ("stride_xhw", "stride_dhw", "stride_yhw", "stride_ghw") if layout == "nchw" else \
                ("stride_xc", "stride_dc", "stride_yc", "stride_gc")
            core = tname == "fp16"  # the others differ only in the element type (run with --runslow)
            dx_ptrs = {"DY": t, "X": t, "S": "*fp32", "DZavg": "*fp32", "DZmax": "*fp32", "Zmax": "*fp32", "DX": t}
            for name, fn, ptrs, extra in (
                    ("se_pool", _se_pool, {"X": t, "Z": "*fp32", "Zmax": "*fp32"}, {"WITH_MAX": True, "BLEND": True}),
                    ("se_scale", _se_scale, {"X": t, "S": "*fp32", "Y": t}, {"BF16_RNE": False}),
                    ("se_bwd_reduce", _se_bwd_reduce, {"DY": t, "X": t, "Zmax": "*fp32", "G": "*fp32",
                                                       "Cnt": "*fp32"}, {"WITH_MAX": True}),
                    ("se_bwd_dx", _se_bwd_dx, dx_ptrs, {"WITH_MAX": True, "BF16_RNE": False, "HAS_DY": True}),
                    ("se_pool_bwd_dx", _se_bwd_dx, dx_ptrs, {"WITH_MAX": True, "BF16_RNE": False, "HAS_DY": False})):
                sig = signature_of(fn, ptrs, floats=("inv_hw",) if fn is _se_pool else ())
                const = dict(BLOCK_C=bc, BLOCK_HW=bhw, **extra)
                unit_strides(sig, const, unit)
                cases.append(AOTCase(f"{name}[{tname},{layout},{bc}x{bhw},w{warps}]", fn, sig, const,
                                     num_warps=warps, num_stages=1, core=core))
        bm, bn, bk, warps = FC_TILE
        for act in ("gelu", "hardsigmoid"):
            sig = signature_of(_se_fc, {"X": "*fp32", "W": t, "B": t, "P": "*fp32", "Y": "*fp32"})
            cases.append(AOTCase(f"se_fc[{tname},{act},{bm}x{bn}x{bk},w{warps}]", _se_fc, sig,
                                 dict(ACT=ACT_CODES[act], HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                                 num_warps=warps, num_stages=2, uses_dot=True, expect_wgmma=False,
                                 core=tname == "fp16" and act == "gelu"))
        sig = signature_of(_eca_conv, {"Z": "*fp32", "W": t, "P": "*fp32", "S": "*fp32"})
        cases.append(AOTCase(f"eca_conv[{tname},k5,{ECA_BLOCK_C}]", _eca_conv, sig,
                             dict(TAPS=5, ACT=ACT_CODES["sigmoid"], BLOCK_C=ECA_BLOCK_C), num_warps=4,
                             num_stages=1, core=tname == "fp16"))
    return cases


AOT_CASES = _aot_cases()
