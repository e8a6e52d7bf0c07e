"""Fused CBAM: channel attention then spatial attention, forward and backward, never writing
x1 = x * ca.

    ca = gate(mlp(mean_hw x) + mlp(max_hw x))       (N, C)      [light: gate(mlp(0.5 mean + 0.5 max))]
    maps = [mean_c(x * ca), max_c(x * ca)]          (N, 2, HW)  [light: 0.5 mean_c + 0.5 max_c]
    sa = gate(bn(conv_kxk(maps)))                   (N, HW)
    y = x * ca * sa

Passes over x (N, C, H, W), NCHW or channels_last, read through strides along the contiguous dim:

* forward: the channel pools (``_se_pool`` of kernels/squeeze_excite.py with BLEND=False: mean and
  max per sample and channel), the MLP (``fc``: the SE GEMM with fused bias and activation),
  ``_cbam_spatial_stats`` (per position: mean and max over channels of x * ca, and how many
  channels hold that max), the k x k conv, BatchNorm and gate on the (N, 1|2, H, W) maps (in the op
  layer, fp32), and ``_cbam_apply`` (y = x * ca * sa). Three reads of x, one write.
* backward: ``_cbam_bwd_gates`` (per position dsa = sum_c dy * x * ca; per channel the partial sums
  of dy * x * sa and the ties of the channel max), the spatial backward on the maps (op layer),
  ``_cbam_bwd_stats`` (per channel the partial sums of x * dmaps routed through mean_c and max_c:
  the rest of dca), the MLP backward (op layer), and ``_cbam_bwd_dx`` writing the whole dx at once.
  Two reads of dy, three of x, one write of dx.

Max ties are handled as torch's amax backward does: the gradient is shared evenly among the
positions (channels) that hold the maximum. The per-channel reductions over positions are written
as partial sums (deterministic, no atomics), summed in the op layer: each of P programs per sample
walks every P-th block of positions and adds into its own row of an (N, P, C) fp32 workspace, with
P = min(blocks, max(16, 512 / N)) (:func:`_parts`), so the workspace is at most (16 N + 512) * C
values however large H * W is.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .aot import AOTCase, signature_of, unit_strides
from .interpreter import bf16_rne, needs_bf16_rne
from .squeeze_excite import NCHW_TILE, NHWC_TILE, _like, _pool_into, as_nc_hw, fc

#: Tiles of the passes over x: (BLOCK_C, BLOCK_HW, num_warps), wide along the contiguous dimension,
#: keyed by channels_last. TILES for the passes on a 2-D grid of tiles (the SE passes' tiles: the
#: access pattern is the same); COLUMN_TILES for those where a program walks all channels of a block
#: of positions (BLOCK_C 8 for NCHW: with 16, fp32 _cbam_bwd_gates spilled on sm_90).
TILES = {False: NCHW_TILE, True: NHWC_TILE}
COLUMN_TILES = {False: (8, 128, 4), True: NHWC_TILE}


# One program computes, for BLOCK_HW positions of one sample, the mean and max over all C channels
# of x * ca, and how many channels hold the max. Reads BLOCK_HW * C elements of x and C gates;
# writes three fp32 values per position.
@triton.jit
def _cbam_spatial_stats(
    X, CA, MEAN, MAX, CNT,             # CA (N, C) fp32; MEAN, MAX, CNT (N, HW) fp32
    C, HW, stride_xn, stride_xc, stride_xhw, inv_c,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    cs0 = tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_HW], dtype=tl.float32)
    best = tl.full([BLOCK_HW], float("-inf"), dtype=tl.float32)
    count = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + cs0
        ok = (cs[:, None] < C) & hw_ok[None, :]
        ca = tl.load(CA + n * C + cs, mask=cs < C, other=0.0)
        x = tl.load(X + n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=ok, other=0.0)
        v = x.to(tl.float32) * ca[:, None]
        total += tl.sum(v, 0)
        v = tl.where(ok, v, float("-inf"))
        m = tl.max(v, 0)
        k = tl.sum(tl.where(v == m[None, :], 1.0, 0.0), 0)
        count = tl.where(m > best, k, tl.where(m == best, count + k, count))
        best = tl.maximum(best, m)
    out = n * HW + hw
    tl.store(MEAN + out, total * inv_c, mask=hw_ok)
    tl.store(MAX + out, best, mask=hw_ok)
    tl.store(CNT + out, count, mask=hw_ok)


# One program writes a BLOCK_C x BLOCK_HW tile of y = x * ca[n, c] * sa[n, hw]: reads the x tile,
# BLOCK_C channel gates and BLOCK_HW spatial gates, writes the y tile.
@triton.jit
def _cbam_apply(
    X, CA, SA, Y,                      # CA (N, C), SA (N, HW) fp32; Y strided like X
    C, HW, stride_xn, stride_xc, stride_xhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BF16_RNE: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    ok = (cs[:, None] < C) & (hw[None, :] < HW)
    ca = tl.load(CA + n * C + cs, mask=cs < C, other=0.0)
    sa = tl.load(SA + n * HW + hw, mask=hw < HW, other=0.0)
    offs = n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw
    x = tl.load(X + offs, mask=ok, other=0.0)
    y = x.to(tl.float32) * ca[:, None] * sa[None, :]
    if BF16_RNE:
        y = bf16_rne(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


# One program takes BLOCK_HW positions of one sample through all C channels and writes: per
# position DSA = sum_c dy * x * ca (the gradient of the spatial gate); per channel, summed over the
# blocks of positions this program walks (every NP-th), DCA = sum_hw dy * x * sa (the direct part of
# the channel gate's gradient) and TIES = how many of these positions equal the channel's max.
# Reads the dy and x columns once; adds into its own workspace row (zeroed by the launcher).
@triton.jit
def _cbam_bwd_gates(
    DY, X, CA, SA, ZMAX, DSA, DCA, TIES,   # DSA (N, HW); DCA, TIES (N, NP, C) fp32, NP programs per sample
    C, HW, NP, stride_dn, stride_dc, stride_dhw, stride_xn, stride_xc, stride_xhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0)
    cs0 = tl.arange(0, BLOCK_C)
    part = (n * NP + p) * C
    for start in range(p * BLOCK_HW, HW, NP * BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        sa = tl.load(SA + n * HW + hw, mask=hw_ok, other=0.0)
        dsa = tl.zeros([BLOCK_HW], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + cs0
            c_ok = cs < C
            ok = c_ok[:, None] & hw_ok[None, :]
            ca = tl.load(CA + n * C + cs, mask=c_ok, other=0.0)
            zmax = tl.load(ZMAX + n * C + cs, mask=c_ok, other=0.0)
            x = tl.load(X + n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=ok,
                        other=0.0).to(tl.float32)
            dy = tl.load(DY + n * stride_dn + cs[:, None] * stride_dc + hw[None, :] * stride_dhw, mask=ok,
                         other=0.0).to(tl.float32)
            dyx = dy * x
            dsa += tl.sum(dyx * ca[:, None], 0)
            acc = tl.load(DCA + part + cs, mask=c_ok, other=0.0)
            tl.store(DCA + part + cs, acc + tl.sum(dyx * sa[None, :], 1), mask=c_ok)
            ties = tl.load(TIES + part + cs, mask=c_ok, other=0.0)
            tl.store(TIES + part + cs, ties + tl.sum(tl.where(ok & (x == zmax[:, None]), 1.0, 0.0), 1), mask=c_ok)
        tl.store(DSA + n * HW + hw, dsa, mask=hw_ok)


# One program takes the blocks of BLOCK_HW positions it walks (every NP-th) of one sample through all
# C channels and adds, per channel, DCA = sum_hw x * (dmean + dmax * [x * ca is the position's
# max]): the part of the channel gate's gradient that flows through the spatial maps. DMEAN is
# already divided by C, DMAX by the number of channels sharing the max. Reads the x column once.
@triton.jit
def _cbam_bwd_stats(
    X, CA, DMEAN, DMAX, MAX, DCA,      # DMEAN, DMAX, MAX (N, HW) fp32; DCA (N, NP, C) fp32, zeroed
    C, HW, NP, stride_xn, stride_xc, stride_xhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0)
    cs0 = tl.arange(0, BLOCK_C)
    part = (n * NP + p) * C
    for start in range(p * BLOCK_HW, HW, NP * BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_ok = hw < HW
        dmean = tl.load(DMEAN + n * HW + hw, mask=hw_ok, other=0.0)
        dmax = tl.load(DMAX + n * HW + hw, mask=hw_ok, other=0.0)
        best = tl.load(MAX + n * HW + hw, mask=hw_ok, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + cs0
            c_ok = cs < C
            ok = c_ok[:, None] & hw_ok[None, :]
            ca = tl.load(CA + n * C + cs, mask=c_ok, other=0.0)
            x = tl.load(X + n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw, mask=ok,
                        other=0.0).to(tl.float32)
            route = dmean[None, :] + tl.where(ok & (x * ca[:, None] == best[None, :]), dmax[None, :], 0.0)
            acc = tl.load(DCA + part + cs, mask=c_ok, other=0.0)
            tl.store(DCA + part + cs, acc + tl.sum(x * route, 1), mask=c_ok)


# One program writes a BLOCK_C x BLOCK_HW tile of the whole input gradient:
#   dx = dy * ca * sa                                  (through y = x * ca * sa)
#      + ca * (dmean + dmax * [x * ca is the max])     (through the spatial maps)
#      + davg + dzmax * [x is the channel's max]       (through the channel pools)
# DAVG is already divided by HW and DZMAX by the tie count. Reads the dy and x tiles, writes dx.
@triton.jit
def _cbam_bwd_dx(
    DY, X, CA, SA, DMEAN, DMAX, MAX, DAVG, DZMAX, ZMAX, DX,
    C, HW, stride_dn, stride_dc, stride_dhw, stride_xn, stride_xc, stride_xhw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BF16_RNE: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_ok = cs < C
    hw_ok = hw < HW
    ok = c_ok[:, None] & hw_ok[None, :]
    ca = tl.load(CA + n * C + cs, mask=c_ok, other=0.0)
    davg = tl.load(DAVG + n * C + cs, mask=c_ok, other=0.0)
    dzmax = tl.load(DZMAX + n * C + cs, mask=c_ok, other=0.0)
    zmax = tl.load(ZMAX + n * C + cs, mask=c_ok, other=0.0)
    sa = tl.load(SA + n * HW + hw, mask=hw_ok, other=0.0)
    dmean = tl.load(DMEAN + n * HW + hw, mask=hw_ok, other=0.0)
    dmax = tl.load(DMAX + n * HW + hw, mask=hw_ok, other=0.0)
    best = tl.load(MAX + n * HW + hw, mask=hw_ok, other=0.0)
    xoffs = n * stride_xn + cs[:, None] * stride_xc + hw[None, :] * stride_xhw
    x = tl.load(X + xoffs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + n * stride_dn + cs[:, None] * stride_dc + hw[None, :] * stride_dhw, mask=ok,
                 other=0.0).to(tl.float32)
    route = dmean[None, :] + tl.where(x * ca[:, None] == best[None, :], dmax[None, :], 0.0)
    dx = ca[:, None] * (dy * sa[None, :] + route) + davg[:, None] + tl.where(x == zmax[:, None], dzmax[:, None], 0.0)
    if BF16_RNE:
        dx = bf16_rne(dx)
    tl.store(DX + xoffs, dx.to(DX.dtype.element_ty), mask=ok)


#: Programs per sample along the positions in the backward's per-channel reductions: at least
#: MIN_PARTS (when there are that many blocks of positions), more for small batches so that about
#: PART_PROGRAMS programs run in all; each owns a row of the (N, parts, C) partial-sum workspace.
MIN_PARTS, PART_PROGRAMS = 16, 512


def _parts(n: int, hw: int, tile) -> int:
    """Programs per sample (workspace rows) of _cbam_bwd_gates and _cbam_bwd_stats."""
    return max(1, min(triton.cdiv(hw, tile[1]), max(MIN_PARTS, triton.cdiv(PART_PROGRAMS, max(n, 1)))))


def channel_pools(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) of x over H, W per sample and channel, (N, C) fp32 each. One read of x."""
    xs, strides, cl = as_nc_hw(x)
    n, c, hh, ww = x.shape
    avg = torch.empty((n, c), device=x.device, dtype=torch.float32)
    mx = torch.empty((n, c), device=x.device, dtype=torch.float32)
    _pool_into(xs, strides, avg, mx, c, hh * ww, TILES[cl], blend=False)
    return avg, mx


def spatial_stats(x: torch.Tensor, ca: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean_c, max_c, count) of x * ca per sample and position, (N, HW) fp32 each; ``count`` is how
    many channels hold the max. One read of x."""
    xs, strides, cl = as_nc_hw(x)
    n, c, hh, ww = x.shape
    hw = hh * ww
    mean, mx, cnt = (torch.empty((n, hw), device=x.device, dtype=torch.float32) for _ in range(3))
    bc, bhw, warps = COLUMN_TILES[cl]
    _cbam_spatial_stats[(triton.cdiv(hw, COLUMN_TILES[cl][1]), n)](
        xs, ca, mean, mx, cnt, c, hw, *strides, 1.0 / c, BLOCK_C=bc, BLOCK_HW=bhw, num_warps=warps)
    return mean, mx, cnt


def apply_gates(x: torch.Tensor, ca: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
    """y = x * ca[:, :, None, None] * sa[:, None] (ca (N, C), sa (N, HW) fp32), in x's memory format."""
    xs, strides, cl = as_nc_hw(x)
    n, c, hh, ww = x.shape
    hw = hh * ww
    y = torch.empty_like(xs)
    bc, bhw, warps = TILES[cl]
    _cbam_apply[(triton.cdiv(hw, bhw), triton.cdiv(c, bc), n)](
        xs, ca, sa, y, c, hw, *strides, BLOCK_C=bc, BLOCK_HW=bhw, BF16_RNE=needs_bf16_rne(x.dtype),
        num_warps=warps)
    return y


def backward_gates(dy: torch.Tensor, x: torch.Tensor, ca: torch.Tensor, sa: torch.Tensor,
                   zmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dsa (N, HW), dca_direct (N, C), ties (N, C)): the gradient of the spatial gate, the part of
    the channel gate's gradient through y = x * ca * sa, and how many positions hold each channel's
    max. One read of dy and x."""
    xs, strides, cl = as_nc_hw(x)
    dys, dstr, _ = _like(dy, cl)
    n, c, hh, ww = x.shape
    hw = hh * ww
    nb = _parts(n, hw, COLUMN_TILES[cl])
    dsa = torch.empty((n, hw), device=x.device, dtype=torch.float32)
    dca = torch.zeros((n, nb, c), device=x.device, dtype=torch.float32)
    ties = torch.zeros((n, nb, c), device=x.device, dtype=torch.float32)
    bc, bhw, warps = COLUMN_TILES[cl]
    _cbam_bwd_gates[(nb, n)](dys, xs, ca, sa, zmax, dsa, dca, ties, c, hw, nb, *dstr, *strides,
                             BLOCK_C=bc, BLOCK_HW=bhw, num_warps=warps)
    return dsa, dca.sum(1), ties.sum(1)


def backward_stats(x: torch.Tensor, ca: torch.Tensor, dmean: torch.Tensor, dmax: torch.Tensor,
                   mx: torch.Tensor) -> torch.Tensor:
    """The part of the channel gate's gradient through the spatial maps, (N, C) fp32 (dmean already
    / C, dmax already / the tie count; all (N, HW) fp32). One read of x."""
    xs, strides, cl = as_nc_hw(x)
    n, c, hh, ww = x.shape
    hw = hh * ww
    nb = _parts(n, hw, COLUMN_TILES[cl])
    dca = torch.zeros((n, nb, c), device=x.device, dtype=torch.float32)
    bc, bhw, warps = COLUMN_TILES[cl]
    _cbam_bwd_stats[(nb, n)](xs, ca, dmean, dmax, mx, dca, c, hw, nb, *strides, BLOCK_C=bc, BLOCK_HW=bhw,
                             num_warps=warps)
    return dca.sum(1)


def backward_input(dy: torch.Tensor, x: torch.Tensor, ca: torch.Tensor, sa: torch.Tensor, dmean: torch.Tensor,
                   dmax: torch.Tensor, mx: torch.Tensor, davg: torch.Tensor, dzmax: torch.Tensor,
                   zmax: torch.Tensor) -> torch.Tensor:
    """The whole dx (see _cbam_bwd_dx), in x's memory format. One read of dy and x, one write."""
    xs, strides, cl = as_nc_hw(x)
    dys, dstr, _ = _like(dy, cl)
    n, c, hh, ww = x.shape
    hw = hh * ww
    dx = torch.empty_like(xs)
    bc, bhw, warps = TILES[cl]
    _cbam_bwd_dx[(triton.cdiv(hw, bhw), triton.cdiv(c, bc), n)](
        dys, xs, ca, sa, dmean, dmax, mx, davg, dzmax, zmax, dx, c, hw, *dstr, *strides,
        BLOCK_C=bc, BLOCK_HW=bhw, BF16_RNE=needs_bf16_rne(x.dtype), num_warps=warps)
    return dx


def mlp(z: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor], activation: str) -> Dict[str, torch.Tensor]:
    """The shared MLP on rows z (M, C) fp32: pre1/h (M, Cr) before and after the activation, out
    (M, C) fp32 (no gate: CBAM sums the two pools' outputs first)."""
    pre1, h = fc(z, fc1_weight, fc1_bias, activation)
    _, out = fc(h, fc2_weight, fc2_bias, "identity")
    return dict(pre1=pre1, h=h, out=out)


def _aot_cases():
    """Every CBAM kernel in the tile it is launched with, per dtype and layout (the unit stride
    compiled in as the launch specialises it); fp16 in the core set."""
    cases = []
    for tname in ("fp16", "bf16", "fp32"):
        t = f"*{tname}"
        f32 = "*fp32"
        for layout, cl in (("nchw", False), ("nhwc", True)):
            unit = ("stride_xhw", "stride_dhw") if layout == "nchw" else ("stride_xc", "stride_dc")
            for name, fn, ptrs, extra in (
                    ("cbam_spatial_stats", _cbam_spatial_stats,
                     {"X": t, "CA": f32, "MEAN": f32, "MAX": f32, "CNT": f32}, {}),
                    ("cbam_apply", _cbam_apply, {"X": t, "CA": f32, "SA": f32, "Y": t}, {"BF16_RNE": False}),
                    ("cbam_bwd_gates", _cbam_bwd_gates,
                     {"DY": t, "X": t, "CA": f32, "SA": f32, "ZMAX": f32, "DSA": f32, "DCA": f32, "TIES": f32}, {}),
                    ("cbam_bwd_stats", _cbam_bwd_stats,
                     {"X": t, "CA": f32, "DMEAN": f32, "DMAX": f32, "MAX": f32, "DCA": f32}, {}),
                    ("cbam_bwd_dx", _cbam_bwd_dx,
                     {"DY": t, "X": t, "CA": f32, "SA": f32, "DMEAN": f32, "DMAX": f32, "MAX": f32, "DAVG": f32,
                      "DZMAX": f32, "ZMAX": f32, "DX": t}, {"BF16_RNE": False})):
                column = fn in (_cbam_spatial_stats, _cbam_bwd_gates, _cbam_bwd_stats)
                bc, bhw, warps = (COLUMN_TILES if column else TILES)[cl]
                sig = signature_of(fn, ptrs, floats=("inv_c",) if fn is _cbam_spatial_stats else ())
                const = dict(BLOCK_C=bc, BLOCK_HW=bhw, **extra)
                unit_strides(sig, const, unit)
                cases.append(AOTCase(f"{name}[{tname},{layout},{bc}x{bhw},w{warps}]", fn, sig, const,
                                     num_warps=warps, num_stages=1, core=tname == "fp16"))
    return cases


AOT_CASES = _aot_cases()
