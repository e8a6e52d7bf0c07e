"""Fused attention backward (FlashAttention-2 style): recompute the probabilities from the saved
log-sum-exp, never materialising the Lq x Lk matrix.

Three kernels: delta = rowsum(dO * O); dQ, one program per query block looping over key blocks;
dK/dV, one program per key block looping over query blocks (and over the query heads that share a
kv head under GQA). dQ gets its own pass instead of atomics so that every gradient is written
exactly once by one program: results are deterministic and need no fp32 scratch.

Exact delta. delta_i = sum_j P_ij dP_ij is the row sum that makes every row of
dS = P * (dP - delta) sum to zero (a softmax gradient is blind to a common shift of a row's
scores). rowsum(dO * O) equals it only for the exact O; the saved O is rounded to bf16/fp16, and that
rounding, times sum_j P_ij k_j, lands in dQ and dK: with bf16, a small head size or a large scale it
alone exceeded twice the bf16 reference's error (tests/test_fuzz.py). So with EXACT_DELTA the dQ pass
runs first, takes the rounded delta as a shift, accumulates its row error c_i = sum_j dS_ij and
B_i = sum_j P_ij k_j (one more dot per key block), returns dQ = sum_j dS_ij k_j - c_i B_i and stores
delta + c for the dK/dV pass. Subtracting the tiny c_i B_i at the end keeps dS small and well
rounded; summing P * dP directly would cancel catastrophically. fp32 takes it too: its O is rounded
as well, and a float mask constant along the keys (whose gradient is exactly 0) got that rounding,
summed over its broadcast rows, as gradient (past the numerics floor, found by the fuzzer).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .aot import AOTCase
from .attention_fwd import (
    INTERPRETER_CONFIG, LOG2E, _dropout_keep, aot_matrix, mask_args, mask_log2, needs_int64, split_lse,
    with_dropout, dtype_class, head_class, lse_shape, aot_problem, aot_name, AOT_LENGTHS, NO_MASK,
    AOT_VARIANTS, FLOAT_MASK, UNMASKED_AOT_VARIANTS, aot_core, interpreting, pad_head, target_cap,
    wgmma_expected)
from .interpreter import bf16_rne, needs_bf16_rne
from .tuning import bucket, forced, pick

#: How _attn_bwd_dkdv writes the gradient of a float mask (constexpr MASK_GRAD): not at all; plain
#: stores (the mask has no broadcast dimension); fp32 atomic adds (broadcast over batch, heads or keys);
#: atomic adds of row sums (broadcast over query rows, e.g. a (B, 1, 1, Lk) padding mask).
NO_MASK_GRAD, MASK_GRAD_STORE, MASK_GRAD_ATOMIC, MASK_GRAD_ROWSUM = 0, 1, 2, 3
_STORE, _ATOMIC, _ROWSUM = (tl.constexpr(v) for v in (MASK_GRAD_STORE, MASK_GRAD_ATOMIC, MASK_GRAD_ROWSUM))


# One program computes delta = rowsum(dO * O) for BLOCK_M rows of one (batch, head): reads the
# BLOCK_M x Ev tiles of O and dO once, writes BLOCK_M fp32 values.
@triton.jit
def _attn_bwd_delta(
    Out, DO, Delta,                   # Out, DO (B, H, Lq, Ev) any strides; Delta (B * H, Lq) fp32
    stride_oz, stride_oh, stride_om, stride_ok,
    stride_dz, stride_dh, stride_dm, stride_dk,
    H, Lq,
    HEAD_DIM_V: tl.constexpr, PAD_EV: tl.constexpr, BLOCK_M: tl.constexpr,
    INT64: tl.constexpr = False,      # 64-bit index arithmetic (a tensor spans 2**31 elements or more)
):
    off_bh = tl.program_id(1).to(tl.int64)
    off_z = off_bh // H
    off_h = off_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, PAD_EV)
    if INT64:
        offs_m, offs_d = offs_m.to(tl.int64), offs_d.to(tl.int64)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM_V)
    o = tl.load(Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off_z * stride_dz + off_h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dk,
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + off_bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _scores(q, kT, mask_ptrs, rows, cols, Lq, Lk, qk_scale, causal_offset,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Scores of a (rows x cols) tile in log2 units, -inf where masked out."""
    s = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale
    keep = (rows[:, None] < Lq) & (cols[None, :] < Lk)
    if IS_CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
    if MASK_KIND == 1:
        keep = keep & (tl.load(mask_ptrs, mask=keep, other=0) != 0)
    if MASK_KIND == 2:
        s = s + mask_log2(tl.load(mask_ptrs, mask=keep, other=0.0))
    return tl.where(keep, s, float("-inf"))


# One program computes dK and dV for BLOCK_N key rows of one (batch, kv head): for each of the GROUP
# query heads sharing the kv head, it streams query blocks from the causal diagonal down, recomputing
# P = exp2(S - lse) and accumulating dV += P^T dO and dK += dS^T Q (fp32).
# Memory traffic: K, V tiles once; per query block visited, Q, dO, lse, delta (and the mask tile);
# dK, dV written once. With MASK_GRAD, dS (the gradient of the additive mask) goes to DMask per tile:
# stored when the mask has no broadcast dimension (every element belongs to this program), else
# added atomically in fp32 (summed over the query rows first when the mask broadcasts along them).
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, DO, Lse, LseLo, Delta, DK, DV,   # DK like K, DV like V (contiguous); Lse, LseLo,
                                                    # Delta (B*Hq, Lq) (LseLo: float masks only)
    DMask,                                   # fp32, the mask's own shape, viewed as (B, Hq, Lq, Lk)
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_dz, stride_dh, stride_dm, stride_dk,   # dO
    stride_dkz, stride_dkh, stride_dkn, stride_dkk,
    stride_dvz, stride_dvh, stride_dvn, stride_dvk,
    stride_gz, stride_gh, stride_gm, stride_gn,   # DMask
    H, HK, GROUP, Lq, Lk, qk_scale, sm_scale, causal_offset,
    dropout_p, dropout_scale, dropout_seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_E: tl.constexpr, PAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, MASK_GRAD: tl.constexpr = 0,
    BF16_RNE: tl.constexpr = False,   # round bf16 stores to nearest (the interpreter truncates)
    INT64: tl.constexpr = False,      # 64-bit index arithmetic (a tensor spans 2**31 elements or more)
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and PAD_E >= 16 and PAD_EV >= 16)
    start_n = tl.program_id(0)
    off_bhk = tl.program_id(1).to(tl.int64)
    off_z = off_bhk // HK
    off_hk = off_bhk % HK
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, PAD_E)
    offs_dv = tl.arange(0, PAD_EV)
    if INT64:
        cols, offs_m = cols.to(tl.int64), offs_m.to(tl.int64)
        offs_d, offs_dv = offs_d.to(tl.int64), offs_dv.to(tl.int64)
    n_valid = cols < Lk

    # K^T and V^T tiles: (PAD_E, BLOCK_N) and (PAD_EV, BLOCK_N)
    kT = tl.load(K + off_z * stride_kz + off_hk * stride_kh + cols[None, :] * stride_kn + offs_d[:, None] * stride_kk,
                 mask=n_valid[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    vT = tl.load(V + off_z * stride_vz + off_hk * stride_vh + cols[None, :] * stride_vn + offs_dv[:, None] * stride_vk,
                 mask=n_valid[None, :] & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
    if DOT_F32:
        kT = kT.to(tl.float32)
        vT = vT.to(tl.float32)
    dk = tl.zeros([BLOCK_N, PAD_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, PAD_EV], dtype=tl.float32)

    lo = 0
    if IS_CAUSAL:
        # query rows above the first visible one (i >= j - causal_offset) see none of these keys
        lo = tl.maximum(0, start_n * BLOCK_N - causal_offset) // BLOCK_M * BLOCK_M
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        off_bh = off_z * H + off_h
        q_base = Q + off_z * stride_qz + off_h * stride_qh
        do_base = DO + off_z * stride_dz + off_h * stride_dh
        m_base = Mask + off_z * stride_mz + off_h * stride_mh
        g_base = DMask + off_z * stride_gz + off_h * stride_gh
        for start_m in range(lo, Lq, BLOCK_M):
            rows = start_m + offs_m
            m_valid = rows < Lq
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                        mask=m_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dm + offs_dv[None, :] * stride_dk,
                         mask=m_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(Lse + off_bh * Lq + rows, mask=m_valid, other=0.0)  # log2 units
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # dead rows: P = 0
            delta = tl.load(Delta + off_bh * Lq + rows, mask=m_valid, other=0.0)
            s = _scores(q, kT, m_base + rows[:, None] * stride_mm + cols[None, :] * stride_mn, rows, cols,
                        Lq, Lk, qk_scale, causal_offset, IS_CAUSAL, MASK_KIND, INPUT_PRECISION)
            if MASK_KIND == 2:  # lse's rounding residual (see attention_fwd)
                lse_lo = tl.load(LseLo + off_bh * Lq + rows, mask=m_valid, other=0.0)
                p = tl.math.exp2((s - lse[:, None]) - lse_lo[:, None])
            else:
                p = tl.math.exp2(s - lse[:, None])                   # (BLOCK_M, BLOCK_N)
            dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)      # (BLOCK_M, BLOCK_N)
            p_v = p
            if HAS_DROPOUT:  # O used P * Z, Z = keep / (1 - p_drop): dV sees P * Z, dP is scaled by Z
                keep_d = _dropout_keep(dropout_seed, off_bh, rows, cols, Lq, Lk, dropout_p)
                p_v = tl.where(keep_d, p * dropout_scale, 0.0)
                dp = tl.where(keep_d, dp * dropout_scale, 0.0)
            p_op = p_v if DOT_F32 else p_v.to(do.dtype)
            dv += tl.dot(tl.trans(p_op), do, input_precision=INPUT_PRECISION)
            ds = p * (dp - delta[:, None])   # d loss / d (scale * q.k + mask), 0 where masked out
            if MASK_GRAD == _STORE:
                tl.store(g_base + rows[:, None] * stride_gm + cols[None, :] * stride_gn, ds,
                         mask=m_valid[:, None] & n_valid[None, :])
            if MASK_GRAD == _ATOMIC:
                tl.atomic_add(g_base + rows[:, None] * stride_gm + cols[None, :] * stride_gn, ds,
                              mask=m_valid[:, None] & n_valid[None, :], sem="relaxed")
            if MASK_GRAD == _ROWSUM:  # invalid rows hold ds = 0
                tl.atomic_add(g_base + cols * stride_gn, tl.sum(ds, 0), mask=n_valid, sem="relaxed")
            ds_op = ds if DOT_F32 else ds.to(q.dtype)
            dk += tl.dot(tl.trans(ds_op), q, input_precision=INPUT_PRECISION)
    dk = dk * sm_scale
    if BF16_RNE:
        dk = bf16_rne(dk)
        dv = bf16_rne(dv)
    keep_k = n_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    keep_v = n_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(DK + off_z * stride_dkz + off_hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkk,
             dk.to(DK.dtype.element_ty), mask=keep_k)
    tl.store(DV + off_z * stride_dvz + off_hk * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvk,
             dv.to(DV.dtype.element_ty), mask=keep_v)


# One program computes dQ for BLOCK_M query rows of one (batch, query head): streams key blocks up to
# the causal diagonal, recomputing P and dS = P * (dO V^T - delta), accumulating dQ += dS K (fp32);
# with EXACT_DELTA also B += P K and c += rowsum(dS), then dQ -= c B (see the module docstring).
# Memory traffic: Q, dO tiles, lse and delta once; K, V (and the mask tile) per key block; dQ once
# (and the exact delta, BLOCK_M fp32).
@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, DO, Lse, LseLo, Delta, DQ,   # DQ like Q (contiguous); LseLo: float masks only
    DeltaOut,                                # EXACT_DELTA: the exact delta (B*Hq, Lq) fp32 for dK/dV
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_dz, stride_dh, stride_dm, stride_dk,
    stride_dqz, stride_dqh, stride_dqm, stride_dqk,
    H, GROUP, Lq, Lk, qk_scale, sm_scale, causal_offset,
    dropout_p, dropout_scale, dropout_seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_E: tl.constexpr, PAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_RNE: tl.constexpr = False,   # round the bf16 store to nearest (the interpreter truncates)
    INT64: tl.constexpr = False,      # 64-bit index arithmetic (a tensor spans 2**31 elements or more)
    EXACT_DELTA: tl.constexpr = False,  # correct the rounded-O delta (module docstring), write DeltaOut
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and PAD_E >= 16 and PAD_EV >= 16)
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    off_z = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, PAD_E)
    offs_dv = tl.arange(0, PAD_EV)
    if INT64:
        rows, offs_n = rows.to(tl.int64), offs_n.to(tl.int64)
        offs_d, offs_dv = offs_d.to(tl.int64), offs_dv.to(tl.int64)
    m_valid = rows < Lq

    q = tl.load(Q + off_z * stride_qz + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                mask=m_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + off_z * stride_dz + off_h * stride_dh + rows[:, None] * stride_dm + offs_dv[None, :] * stride_dk,
                 mask=m_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + off_bh * Lq + rows, mask=m_valid, other=0.0)  # log2 units
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    lse_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    if MASK_KIND == 2:  # lse's rounding residual (see attention_fwd)
        lse_lo = tl.load(LseLo + off_bh * Lq + rows, mask=m_valid, other=0.0)
    delta = tl.load(Delta + off_bh * Lq + rows, mask=m_valid, other=0.0)
    k_base = K + off_z * stride_kz + off_hk * stride_kh
    v_base = V + off_z * stride_vz + off_hk * stride_vh
    m_base = Mask + off_z * stride_mz + off_h * stride_mh + rows[:, None] * stride_mm
    dq = tl.zeros([BLOCK_M, PAD_E], dtype=tl.float32)
    if EXACT_DELTA:
        pk = tl.zeros([BLOCK_M, PAD_E], dtype=tl.float32)   # B = sum_j P_ij k_j
        row_err = tl.zeros([BLOCK_M], dtype=tl.float32)     # c = sum_j dS_ij = exact delta - delta

    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, tl.maximum(0, (start_m + 1) * BLOCK_M + causal_offset))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < Lk
        kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kk,
                     mask=n_valid[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vT = tl.load(v_base + cols[None, :] * stride_vn + offs_dv[:, None] * stride_vk,
                     mask=n_valid[None, :] & (offs_dv[:, None] < HEAD_DIM_V), other=0.0)
        if DOT_F32:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s = _scores(q, kT, m_base + cols[None, :] * stride_mn, rows, cols, Lq, Lk, qk_scale, causal_offset,
                    IS_CAUSAL, MASK_KIND, INPUT_PRECISION)
        if MASK_KIND == 2:
            p = tl.math.exp2((s - lse[:, None]) - lse_lo[:, None])
        else:
            p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(_dropout_keep(dropout_seed, off_bh, rows, cols, Lq, Lk, dropout_p), dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        ds_op = ds if DOT_F32 else ds.to(kT.dtype)
        dq += tl.dot(ds_op, tl.trans(kT), input_precision=INPUT_PRECISION)
        if EXACT_DELTA:
            row_err += tl.sum(ds, 1)
            p_op = p if DOT_F32 else p.to(kT.dtype)
            pk += tl.dot(p_op, tl.trans(kT), input_precision=INPUT_PRECISION)
    if EXACT_DELTA:
        dq -= row_err[:, None] * pk
        tl.store(DeltaOut + off_bh * Lq + rows, delta + row_err, mask=m_valid)
    dq = dq * sm_scale
    if BF16_RNE:
        dq = bf16_rne(dq)
    tl.store(DQ + off_z * stride_dqz + off_h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqk,
             dq.to(DQ.dtype.element_ty), mask=m_valid[:, None] & (offs_d[None, :] < HEAD_DIM))


#: dK/dV tile candidates (BLOCK_M query rows streamed, BLOCK_N key rows owned, warps, stages) and dQ
#: tile candidates, by dtype class and padded head size; as FWD_CONFIGS: timed on first use by
#: kernels/tuning.py, the first is the default, each kept for a clean static profile in the heaviest
#: variants (no spills on sm_90, wgmma for 16-bit dots whose M is 64 or more: the dK/dV dots have
#: M = BLOCK_N, the dQ dots M = BLOCK_M). Head size 256 takes 32-row dK/dV tiles (mma.sync, no
#: wgmma): its two fp32 accumulators spill otherwise. The 16-bit dQ tiles hold two fp32 accumulators
#: too (dQ and the exact delta's B), hence 16 keys per block at head size 128 and 16 rows at 256;
#: fp32 dQ tiles are 16 x 16 (32-row ones spilled); at head size 64 on sm_90, 64 x 32 with 4 warps
#: spilled 88 B in the bf16 causal float-mask variant and was dropped, and so was 64 x 64 with 8 warps
#: (12 B) once the float-mask variants read the log-sum-exp's residual; sm_80 fp32 dK/dV at head size
#: 128 takes 8 warps for the same reason (4 warps spilled 8 B with dropout, 8 warps use 80 registers).
#: Not yet timed on a GPU.
DKDV_CONFIGS = {
    90: {"16bit": {64: [(32, 64, 4, 2), (16, 64, 4, 2), (32, 128, 8, 2), (32, 64, 4, 3)],
                   128: [(32, 64, 8, 2), (16, 64, 8, 2)],
                   256: [(16, 32, 8, 1), (32, 32, 8, 1)]},
         "fp32": {64: [(16, 32, 8, 1)],
                  128: [(16, 16, 8, 1), (32, 16, 8, 1)],
                  256: [(16, 16, 4, 1)]}},
    80: {"16bit": {64: [(16, 32, 4, 2)],
                   128: [(32, 64, 8, 2), (16, 64, 8, 2)],
                   256: [(16, 32, 8, 1)]},
         "fp32": {64: [(32, 32, 4, 1)],
                  128: [(32, 16, 8, 1)],
                  256: [(16, 16, 4, 1)]}},
}
DQ_CONFIGS = {
    90: {"16bit": {64: [(64, 32, 8, 2), (128, 32, 8, 2)],
                   128: [(64, 16, 8, 2)],
                   256: [(16, 16, 8, 1)]},
         "fp32": {64: [(16, 16, 8, 1)],
                  128: [(16, 16, 4, 1)],
                  256: [(16, 16, 4, 1), (16, 16, 8, 1)]}},
    80: {"16bit": {64: [(64, 16, 8, 2)],
                   128: [(32, 32, 8, 2)],
                   256: [(16, 16, 4, 1)]},
         "fp32": {64: [(16, 16, 8, 1)],
                  128: [(16, 16, 4, 1)],
                  256: [(16, 16, 8, 1)]}},
}
#: The candidates of calls without a mask, dropout or GQA whose head sizes are exactly their column's
#: (E = Ev = 64 or 128), where they differ from the tables above: on sm_90 in 16 bits, dK/dV 64x64
#: with 4 warps (one warpgroup, m64n64/n128 wgmma; 255 registers at E=128, clean) and dQ 64x32 with
#: 4 warps. A smaller head size (masked head dims) spills at these tiles (dK/dV E=72: 168 B), as do
#: the mask and dropout variants, so those keep the tables above. Modelled (perfmodel, H100, bf16,
#: L=16k, E=128): backward 140 -> 425 TFLOP/s (tutorial 283).
DKDV_CONFIGS_UNMASKED = {90: {"16bit": {64: [(64, 64, 4, 1)], 128: [(64, 64, 4, 1)]}}}
DQ_CONFIGS_UNMASKED = {90: {"16bit": {64: [(64, 32, 4, 2)], 128: [(64, 32, 4, 2)]}}}


def unmasked_configs(table, cap: int, dtype: torch.dtype, col: int, e: int, ev: int, plain: bool, general):
    """The candidates of a call: for one without a mask, dropout or GQA (``plain``) whose head sizes
    are the column's, ``table``'s (DKDV_CONFIGS_UNMASKED / DQ_CONFIGS_UNMASKED) first, then the
    ``general`` ones (clean in every variant, for the tuner to weigh on a real GPU); else ``general``."""
    special = table.get(cap, {}).get(dtype_class(dtype), {}).get(col) if plain and e == ev == col else None
    return list(dict.fromkeys([*special, *general])) if special else general


#: Known spills, bytes, of table entries for which no candidate compiled spill-free on its target in
#: every variant (fp32 at head size 256, dK/dV: its two 16 x 256 fp32 accumulators plus the recomputed
#: tiles; tried 16x16 with 2, 4 and 8 warps and 1 or 2 stages). Tolerated by the compile test up to
#: this many bytes; removing them is GPU tuning work.
SPILL_BUDGETS = {("attn_bwd_dkdv", "fp32", 256, (16, 16, 4, 1)): 16}
#: The dQ pass corrects delta to the exact sum_j P_ij dP_ij (module docstring). False gives
#: FlashAttention's delta = rowsum(dO * O) of the saved output: one dot fewer per key block in the dQ
#: pass, but rows of dS that sum to O's rounding error instead of zero.
USE_EXACT_DELTA = True
#: Rows per program and warps of the delta pass (16 x 256 tiles over 8 warps: wider ones spilled).
DELTA_BLOCK_M = 16
DELTA_WARPS = 8


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, mask: Optional[torch.Tensor], scale: float, is_causal: bool,
                  causal_offset: int, allow_tf32: bool = False, dropout_p: float = 0.0,
                  dropout_seed: int = 0, mask_grad: bool = False, deterministic: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients (dq, dk, dv, dmask) of attention_fwd's output given dO; dq, dk, dv have the shapes
    of q, k, v (contiguous). ``lse`` is the forward's fp32 log-sum-exp in log2 units ((B, Hq, Lq), or
    (2, B, Hq, Lq) with its rounding residual for a float mask: see attention_fwd);
    ``mask`` as in attention_fwd. With ``mask_grad`` (a float mask), dmask is the gradient of the
    mask in its own shape and dtype (summed over its broadcast dimensions), else None.

    dq, dk, dv are always deterministic (each element is written once by one program). A mask
    gradient summed over broadcast dimensions is added with fp32 atomics, whose order varies from
    run to run on a GPU; with ``deterministic`` it is written once per (b, h, i, j) into a full
    (B, Hq, Lq, Lk) fp32 buffer and summed by torch instead (more memory, same bits every run), and
    the tile configs are the first candidates rather than the timed fastest."""
    b, h, lq, e = q.shape
    hk, lk, ev = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    mask_grad = mask_grad and mask is not None and mask.is_floating_point()
    # zero-filled: the kernel skips the blocks above the causal diagonal and adds into broadcast dims
    dmask = torch.zeros(mask.shape, device=q.device, dtype=torch.float32) if mask_grad else None
    if lq == 0 or lk == 0 or b * h == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), None if dmask is None else dmask.to(mask.dtype)
    pad_e, pad_ev = pad_head(e), pad_head(ev)
    if interpreting():
        cands_kv = cands_q = [INTERPRETER_CONFIG]
        delta_m = INTERPRETER_CONFIG[0]
    else:
        cap, cls, col = target_cap(q.device), dtype_class(q.dtype), head_class(pad_e, pad_ev)
        cands_kv, cands_q, delta_m = DKDV_CONFIGS[cap][cls][col], DQ_CONFIGS[cap][cls][col], DELTA_BLOCK_M
        if dropout_p > 0.0:  # as the forward: fewer keys per dQ block (dK/dV tiles fit as they are)
            cands_q = list(dict.fromkeys(with_dropout(c) for c in cands_q))
        plain = mask is None and dropout_p == 0.0 and hk == h  # the gate compiles these tiles without GQA
        cands_kv = unmasked_configs(DKDV_CONFIGS_UNMASKED, cap, q.dtype, col, e, ev, plain, cands_kv)
        cands_q = unmasked_configs(DQ_CONFIGS_UNMASKED, cap, q.dtype, col, e, ev, plain, cands_q)

    mask_kind, mask_arg, ms = mask_args(mask, q, lk)
    lse_hi, lse_lo = split_lse(lse)
    grad_mode, dmask_arg, gs = _mask_grad_args(dmask, q, lk)
    full_dmask = None
    if deterministic and grad_mode in (MASK_GRAD_ATOMIC, MASK_GRAD_ROWSUM):
        full_dmask = torch.zeros((b, h, lq, lk), device=q.device, dtype=torch.float32)
        grad_mode, dmask_arg, gs = MASK_GRAD_STORE, full_dmask, full_dmask.stride()
    int64 = needs_int64(q, k, v, out, do, dq, dk, dv, mask_arg if mask_kind else None,
                        dmask_arg.expand(b, h, lq, lk) if grad_mode else None)

    delta = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    _attn_bwd_delta[(triton.cdiv(lq, delta_m), b * h)](
        out, do, delta, *out.stride(), *do.stride(), h, lq, HEAD_DIM_V=ev, PAD_EV=pad_ev, BLOCK_M=delta_m,
        INT64=int64, num_warps=DELTA_WARPS)

    delta_out = torch.empty_like(delta) if USE_EXACT_DELTA else delta
    common = dict(HEAD_DIM=e, HEAD_DIM_V=ev, PAD_E=pad_e, PAD_EV=pad_ev, IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
                  HAS_DROPOUT=dropout_p > 0.0,
                  DOT_F32=interpreting() and q.dtype == torch.bfloat16, BF16_RNE=needs_bf16_rne(q.dtype),
                  INPUT_PRECISION="tf32" if (q.dtype == torch.float32 and allow_tf32) else "ieee", INT64=int64)
    strides = (*q.stride(), *k.stride(), *v.stride(), *ms, *do.stride())
    drop = (dropout_p, 1.0 / (1.0 - dropout_p), dropout_seed)

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        _attn_bwd_dkdv[(triton.cdiv(lk, bn), b * hk)](
            q, k, v, mask_arg, do, lse_hi, lse_lo, delta_out, dk, dv, dmask_arg, *strides, *dk.stride(), *dv.stride(), *gs,
            h, hk, h // hk, lq, lk, scale * LOG2E, scale, causal_offset, *drop,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, MASK_GRAD=grad_mode, **common)

    def launch_dq(cfg):
        bm, bn, warps, stages = cfg
        _attn_bwd_dq[(triton.cdiv(lq, bm), b * h)](
            q, k, v, mask_arg, do, lse_hi, lse_lo, delta, dq, delta_out, *strides, *dq.stride(),
            h, h // hk, lq, lk, scale * LOG2E, scale, causal_offset, *drop,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, EXACT_DELTA=USE_EXACT_DELTA, **common)

    key = (q.device, q.dtype, tuple(sorted(common.items())), bucket(lq), bucket(lk), bucket(b * h))
    # dQ first: with USE_EXACT_DELTA it writes the delta that dK/dV read
    launch_dq(pick(("attn_bwd_dq",) + key, cands_q, launch_dq, deterministic=deterministic))
    cfg_kv = pick(("attn_bwd_dkdv", grad_mode, hk != h) + key, cands_kv, launch_dkdv, deterministic=deterministic)
    if dmask is not None and full_dmask is None:
        dmask.zero_()  # timed runs (if any) added into it
    launch_dkdv(cfg_kv)
    if full_dmask is not None:  # sum over the mask's broadcast dimensions, in a fixed order
        dims = [i for i, (size, full) in enumerate(zip(dmask.shape, full_dmask.shape)) if size != full]
        dmask = full_dmask.sum(dims, keepdim=True)
    return dq, dk, dv, None if dmask is None else dmask.to(mask.dtype)


def _mask_grad_args(dmask: Optional[torch.Tensor], q: torch.Tensor, lk: int):
    """(MASK_GRAD mode, pointer, 4 strides) for the fp32 mask-gradient buffer (None: not wanted)."""
    if dmask is None:
        return NO_MASK_GRAD, q, (0, 0, 0, 0)
    b, h, lq, _ = q.shape
    full = (b, h, lq, lk)
    bcast = [size != want for size, want in zip(dmask.shape, full)]
    if not any(bcast):
        mode = MASK_GRAD_STORE
    elif bcast[2] and not bcast[3]:
        mode = MASK_GRAD_ROWSUM
    else:
        mode = MASK_GRAD_ATOMIC
    return mode, dmask, dmask.expand(full).stride()


#: The backward's extra AOT variant: dK/dV writing a float mask's gradient with atomics (the heavier
#: of the write modes; compiled for every dK/dV candidate).
DMASK_VARIANT = (True, FLOAT_MASK, False, ",causal,fmask,dmask")


def _bwd_launch(dtype, col, shape, kernel, cfg, causal, mask_kind, dropout, mask_grad):
    """The backward launcher on an AOT problem (attention_fwd.aot_problem), ``kernel``'s tile forced."""
    def call():
        q, k, v, mask = aot_problem(dtype, col, shape, mask_kind == FLOAT_MASK)
        b, h, lq, _ = q.shape
        lse = torch.empty(lse_shape(b, h, lq, mask is not None), device="meta", dtype=torch.float32)
        with forced({kernel: cfg}):
            attention_bwd(torch.empty_like(q), q, k, v, torch.empty_like(q), lse, mask, q.shape[-1] ** -0.5, causal,
                          0, False, 0.1 if dropout else 0.0, 1, mask_grad)
    return call


def _aot_cases():
    """Every candidate of DKDV_CONFIGS and DQ_CONFIGS in the variants of attention_fwd.AOT_VARIANTS (and
    dK/dV in DMASK_VARIANT), and the delta pass, each compiled as the launcher launches it on the
    aligned AOT problem; the core ones on the unaligned problem too."""
    cases = []
    for kernel, fn, configs, tile, variants in (
            ("attn_bwd_dkdv", _attn_bwd_dkdv, DKDV_CONFIGS, lambda cfg: cfg, AOT_VARIANTS + (DMASK_VARIANT,)),
            ("attn_bwd_dq", _attn_bwd_dq, DQ_CONFIGS, with_dropout, AOT_VARIANTS)):
        for dtype, tname, e, cfg, variant, first, caps in aot_matrix(configs, tile, variants):
            causal, mask_kind, dropout, suffix = variant
            bm, bn, w, st = cfg
            dot_m = bn if fn is _attn_bwd_dkdv else bm  # rows of the dots' output tiles
            core = aot_core(tname, e, causal, dropout, first)
            if variant is DMASK_VARIANT:
                core = first and e == 128 and tname != "bf16"
            budget = SPILL_BUDGETS.get((kernel, "fp32" if tname == "fp32" else "16bit", e, cfg), 0)
            for shape in AOT_LENGTHS if core else ("aligned",):
                cases.append(AOTCase(aot_name(kernel, tname, e, shape, cfg, suffix), fn,
                                     launch=_bwd_launch(dtype, e, shape, kernel, cfg, causal, mask_kind, dropout,
                                                        variant is DMASK_VARIANT),
                                     num_warps=w, num_stages=st, uses_dot=True,
                                     expect_wgmma=wgmma_expected(dtype, dot_m, w), core=core, targets=caps,
                                     spill_budget=budget))
    for kernel, fn, configs in (("attn_bwd_dkdv", _attn_bwd_dkdv, DKDV_CONFIGS_UNMASKED),
                                ("attn_bwd_dq", _attn_bwd_dq, DQ_CONFIGS_UNMASKED)):
        for dtype, tname, e, cfg, variant, first, caps in aot_matrix(configs, variants=UNMASKED_AOT_VARIANTS):
            causal, mask_kind, dropout, suffix = variant
            dot_m = cfg[1] if fn is _attn_bwd_dkdv else cfg[0]
            core = first and causal
            for shape in ("aligned", "ragged") if core else ("aligned",):
                cases.append(AOTCase(aot_name(kernel, tname, e, shape, cfg, suffix), fn,
                                     launch=_bwd_launch(dtype, e, shape, kernel, cfg, causal, mask_kind, dropout, False),
                                     num_warps=cfg[2], num_stages=cfg[3], uses_dot=True,
                                     expect_wgmma=wgmma_expected(dtype, dot_m, cfg[2]), core=core, targets=caps))
    for dtype, tname in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        for e in (64, 256):
            cases.append(AOTCase(f"attn_bwd_delta[{tname},E{e},{DELTA_BLOCK_M}]", _attn_bwd_delta,
                                 launch=_bwd_launch(dtype, e, "aligned", "attn_bwd_dq", None, False, NO_MASK, False,
                                                    False),
                                 num_warps=DELTA_WARPS, num_stages=3))
    return cases


AOT_CASES = _aot_cases()
