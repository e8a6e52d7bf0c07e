"""Fused attention forward (FlashAttention-2 style): O = softmax(Q K^T * scale + mask) V and the
log-sum-exp of every query row, without ever materialising the Lq x Lk score matrix.

Layout (B, H, L, E) read through strides, so (B, L, H, E) views need no copy. GQA maps query head h
to key/value head h // GROUP. Head sizes E and Ev are padded inside the kernel to powers of two
(>= 16, the smallest tl.dot operand) with masked loads.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .aot import AOTCase
from .interpreter import bf16_rne, interpreting, needs_bf16_rne
from .tuning import bucket, forced, pick

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
#: The largest finite fp32; a finite mask value whose score in log2 units would overflow becomes its
#: negative (see mask_log2).
FLT_MAX = 3.4028234663852886e38
_FLT_MAX = tl.constexpr(FLT_MAX)

#: Mask kinds (constexpr MASK_KIND).
NO_MASK, BOOL_MASK, FLOAT_MASK = 0, 1, 2


@triton.jit
def _dropout_keep(seed, off_bh, rows, cols, Lq, Lk, dropout_p):
    """Keep-mask of a (rows x cols) tile of head ``off_bh``: Philox draws indexed by the element's flat
    position in (B * Hq, Lq, Lk), so forward, backward and dropout_keep_mask agree bit for bit."""
    offsets = off_bh * Lq * Lk + rows[:, None].to(tl.int64) * Lk + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def mask_log2(mv):
    """A float mask tile in log2 units (fp32). A finite value below -FLT_MAX / log2(e) (about
    -2.36e38; Hugging Face masks with torch.finfo(dtype).min) becomes -FLT_MAX instead of overflowing
    to -inf: it hides its key, but a row hidden only by such values averages them, as in torch,
    where -inf gives a dead row (zeros). NaN and -inf pass through."""
    mv = mv.to(tl.float32)
    m2 = mv * _LOG2E
    return tl.where((m2 == float("-inf")) & (mv != float("-inf")), -_FLT_MAX, m2)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, offs_dv, m_valid,
               stride_kn, stride_kk, stride_vn, stride_vk, stride_mn, Lq, Lk, qk_scale, causal_offset,
               dropout_p, dropout_scale, dropout_seed, off_bh,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_E: tl.constexpr, PAD_EV: tl.constexpr,
               IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_F32: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key block (keys start_n ..) of _attn_fwd's online softmax: returns the updated (acc, l_i,
    m_i). ``MASKED``: the block may hold keys past Lk or past a row's causal diagonal, or a mask tensor
    applies (bounds, causal and mask ``keep`` with a ``where``); else every key is visible to every row
    (only head dims beyond HEAD_DIM are masked in the loads)."""
    cols = start_n + offs_n
    if MASKED:
        n_valid = cols < Lk
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kk,
                    mask=n_valid[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    elif PAD_E == HEAD_DIM:
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kk)
    else:
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kk,
                    mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
    if MASKED:
        keep = m_valid[:, None] & n_valid[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + causal_offset)
        if MASK_KIND == 1:
            mv = tl.load(mask_base + cols[None, :] * stride_mn, mask=keep, other=0)
            keep = keep & (mv != 0)
        if MASK_KIND == 2:
            s = s + mask_log2(tl.load(mask_base + cols[None, :] * stride_mn, mask=keep, other=0.0))
        s = tl.where(keep, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vk,
                    mask=n_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    elif PAD_EV == HEAD_DIM_V:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vk)
    else:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vk,
                    mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
    if HAS_DROPOUT:  # the row sum above is taken before dropout, as softmax comes first
        p = tl.where(_dropout_keep(dropout_seed, off_bh, offs_m, cols, Lq, Lk, dropout_p), p * dropout_scale, 0.0)
    if DOT_F32:
        v = v.to(tl.float32)
        p_op = p
    else:
        p_op = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p_op, v, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


# One program computes BLOCK_M query rows of one (batch, query head): it streams the key/value rows
# of its kv head in BLOCK_N blocks (stopping at the causal diagonal), keeping a running max and
# running sum per row (online softmax, base 2 with log2(e) folded into the scale).
# Memory traffic per program: Q tile once, K and V once per block visited (whole KV blocks above
# the diagonal are skipped), the mask tile per block if any, O tile and LSE written once.
@triton.jit
def _attn_fwd(
    Q, K, V, Mask, Out, Lse, LseLo,   # Q (B, Hq, Lq, E), K (B, Hk, Lk, E), V (B, Hk, Lk, Ev),
                                      # Mask broadcast to (B, Hq, Lq, Lk) by strides, Out (B, Hq, Lq, Ev),
                                      # Lse, LseLo (B * Hq, Lq) fp32, log2 units (see attention_fwd)
    stride_qz, stride_qh, stride_qm, stride_qk,
    stride_kz, stride_kh, stride_kn, stride_kk,
    stride_vz, stride_vh, stride_vn, stride_vk,
    stride_mz, stride_mh, stride_mm, stride_mn,
    stride_oz, stride_oh, stride_om, stride_ok,
    H, GROUP, Lq, Lk,                 # query heads, query heads per kv head, lengths
    qk_scale,                         # scale * log2(e)
    causal_offset,                    # key j is visible from query i when j <= i + causal_offset
    dropout_p, dropout_scale, dropout_seed,  # drop probability, 1 / (1 - p), Philox seed
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_E: tl.constexpr, PAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_F32: tl.constexpr,            # cast dot operands to fp32 (bf16 under the interpreter)
    INPUT_PRECISION: tl.constexpr,    # "ieee" for fp32 inputs unless tf32 is allowed
    BF16_RNE: tl.constexpr = False,   # round the bf16 output to nearest (the interpreter truncates)
    INT64: tl.constexpr = False,      # 64-bit index arithmetic (a tensor spans 2**31 elements or more)
    EVEN_N: tl.constexpr = False,     # Lk % BLOCK_N == 0: no partial key block
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and PAD_E >= 16 and PAD_EV >= 16)
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    off_z = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, PAD_E)
    offs_dv = tl.arange(0, PAD_EV)
    if INT64:
        offs_m, offs_n = offs_m.to(tl.int64), offs_n.to(tl.int64)
        offs_d, offs_dv = offs_d.to(tl.int64), offs_dv.to(tl.int64)
    m_valid = offs_m < Lq

    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk
    q = tl.load(q_ptrs, mask=m_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + off_z * stride_kz + off_hk * stride_kh
    v_base = V + off_z * stride_vz + off_hk * stride_vh
    mask_base = Mask + off_z * stride_mz + off_h * stride_mh + offs_m[:, None] * stride_mm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, PAD_EV], dtype=tl.float32)

    hi = Lk
    if IS_CAUSAL:
        # keys past the last row's diagonal are invisible to the whole block
        hi = tl.minimum(Lk, tl.maximum(0, (start_m + 1) * BLOCK_M + causal_offset))
    # Without a mask tensor, the key blocks every row of this block sees whole (in range, and for causal
    # left of the first row's diagonal) run without bounds or causal masking; the rest (the diagonal
    # band and the last partial block) run masked. The blocks and their order are the same either way.
    lo = 0
    if MASK_KIND == 0:
        lo = Lk if EVEN_N else (Lk // BLOCK_N) * BLOCK_N
        if IS_CAUSAL:
            lo = tl.minimum(lo, (tl.maximum(0, start_m * BLOCK_M + causal_offset + 1) // BLOCK_N) * BLOCK_N)
        for start_n in range(0, lo, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, offs_dv, m_valid,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_mn, Lq, Lk, qk_scale, causal_offset,
                dropout_p, dropout_scale, dropout_seed, off_bh, HEAD_DIM, HEAD_DIM_V, PAD_E, PAD_EV, IS_CAUSAL,
                MASK_KIND, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, False)
    if MASK_KIND != 0 or IS_CAUSAL or not EVEN_N:  # (else every block ran above)
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, offs_dv, m_valid,
                stride_kn, stride_kk, stride_vn, stride_vk, stride_mn, Lq, Lk, qk_scale, causal_offset,
                dropout_p, dropout_scale, dropout_seed, off_bh, HEAD_DIM, HEAD_DIM_V, PAD_E, PAD_EV, IS_CAUSAL,
                MASK_KIND, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, True)

    alive = l_i != 0.0  # 0: every key masked out (a dead row); NaN: a NaN score, which must propagate
    out = acc / tl.where(alive, l_i, 1.0)[:, None]
    lse = tl.where(alive, m_i + tl.math.log2(tl.where(alive, l_i, 1.0)), float("-inf"))
    o_ptrs = Out + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_ok
    if BF16_RNE:
        out = bf16_rne(out)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + off_bh * Lq + offs_m, lse, mask=m_valid)
    if MASK_KIND == 2:  # what lse's rounding lost (all of log2(l) where a finfo.min mask makes |m| huge)
        lse_lo = tl.where(alive, (tl.where(alive, m_i, 0.0) - tl.where(alive, lse, 0.0))
                          + tl.math.log2(tl.where(alive, l_i, 1.0)), 0.0)
        tl.store(LseLo + off_bh * Lq + offs_m, lse_lo, mask=m_valid)


def pad_head(e: int) -> int:
    """Head size rounded up to a power of two, at least 16 (tl.dot's smallest operand)."""
    return max(16, triton.next_power_of_2(e))


#: Tile config under the interpreter: 32 x 32 runs about 3x faster there than 16 x 16 (fewer, larger
#: numpy operations) while tests of 40-70 rows still cross block boundaries.
INTERPRETER_CONFIG = (32, 32, 4, 1)


#: Forward tile candidates on a GPU, (BLOCK_M, BLOCK_N, num_warps, num_stages) by target compute
#: capability (90: Hopper and newer, 80: Ampere/Ada), dtype class and padded head size (the wider of
#: E and Ev). kernels/tuning.py times them on first use and keeps the fastest; the first is the
#: default when tuning is off. Each is kept for a clean static profile on its target in every variant
#: (tests/test_compile.py, which compiles each as the launcher launches it): no register spills and,
#: on sm_90, wgmma for 16-bit dots (BLOCK_M >= 64, 4+ warps). Not yet timed on a GPU.
FWD_CONFIGS = {
    90: {"16bit": {64: [(64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
                   128: [(64, 32, 8, 2)],
                   256: [(64, 16, 8, 2)]},
         "fp32": {64: [(32, 16, 4, 1), (64, 16, 4, 1), (32, 32, 4, 1)],
                  128: [(16, 16, 4, 1), (16, 32, 4, 1)],
                  256: [(16, 16, 4, 1)]}},
    80: {"16bit": {64: [(64, 32, 4, 2), (64, 32, 4, 3)],
                   128: [(64, 32, 8, 2)],
                   256: [(64, 16, 8, 2)]},
         "fp32": {64: [(32, 16, 4, 1), (64, 16, 4, 1), (32, 32, 4, 1)],
                  128: [(16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 1)],
                  256: [(16, 16, 4, 1), (16, 16, 8, 1)]}},
}


#: The candidates of the variants without a mask, dropout or GQA (plain and causal), where they differ
#: from FWD_CONFIGS: on sm_90 in 16 bits, BLOCK_M = 128, so each of the two warpgroups owns 64 rows of
#: its own (no score tile computed twice) and both dots run as m64n64+ wgmma. Compiled as launched
#: (aligned and unaligned problems) they are clean: at E=128, 128x128 w8 uses 241 registers aligned
#: and 255 unaligned, 128x64 w8 171 and 255. The float-mask and dropout variants spill at these tiles
#: (1.4 KB at 128x64, E=128 unaligned, with a float mask) and keep FWD_CONFIGS. Modelled (perfmodel,
#: H100, bf16 L=16k): E128 forward 285 -> 565 TFLOP/s, causal 284 -> 490, E64 480 -> 660.
FWD_CONFIGS_UNMASKED = {
    90: {"16bit": {64: [(128, 64, 8, 2)],
                   128: [(128, 128, 8, 2), (128, 64, 8, 2)]}},
}


def target_cap(device: torch.device) -> int:
    """The config table for a CUDA device: 90 from Hopper on, else 80."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def head_class(pad_e: int, pad_ev: int) -> int:
    """The config column for these padded head sizes: 64 (covers 16..64), 128 or 256."""
    return max(64, pad_e, pad_ev)


def with_dropout(cfg: Tuple[int, int, int, int]) -> Tuple[int, int, int, int]:
    """The tile for the dropout variant: half as many keys per block (the Philox rounds on a
    BLOCK_M x BLOCK_N tile of draws otherwise spill on sm_90)."""
    bm, bn, w, st = cfg
    return bm, max(16, bn // 2), w, st


def gpu_configs(pad_e: int, pad_ev: int, dtype: torch.dtype, dropout: bool = False,
                cap: int = 90, masked: bool = True) -> List[Tuple[int, int, int, int]]:
    """The forward's tile candidates on an sm_<cap> GPU: FWD_CONFIGS, in their dropout form if
    ``dropout``; for a call without a mask, dropout or GQA (``masked=False``), FWD_CONFIGS_UNMASKED's
    entry first where it has one, then FWD_CONFIGS' (clean in every variant, for the tuner)."""
    cls, col = dtype_class(dtype), head_class(pad_e, pad_ev)
    cfgs = FWD_CONFIGS[cap][cls][col]
    if not masked and not dropout:
        return _unique([*FWD_CONFIGS_UNMASKED.get(cap, {}).get(cls, {}).get(col, []), *cfgs])
    return _unique([with_dropout(c) for c in cfgs]) if dropout else list(cfgs)


def _unique(cfgs):
    return list(dict.fromkeys(cfgs))


def launch_configs(q: torch.Tensor, pad_e: int, pad_ev: int, dropout: bool = False, masked: bool = True):
    """The candidates a launch chooses from: the interpreter's one tile, or the device's set."""
    if interpreting():
        return [INTERPRETER_CONFIG]
    return gpu_configs(pad_e, pad_ev, q.dtype, dropout, target_cap(q.device), masked)


#: Offsets a kernel may compute in int32: beyond, the launchers set INT64.
INT32_OFFSET_LIMIT = 2 ** 31 - 1


def needs_int64(*tensors: Optional[torch.Tensor], pad: int = 256) -> bool:
    """Whether a kernel's element offsets into one of ``tensors`` can reach 2**31: the largest
    offset, with ``pad`` extra indices per dimension for the masked lanes of the last tile, in
    elements. int32 products such as ``row * stride_row`` would wrap there."""
    for t in tensors:
        if t is not None and t.numel() > 0:
            if sum((size + pad) * abs(stride) for size, stride in zip(t.shape, t.stride())) > INT32_OFFSET_LIMIT:
                return True
    return False


def mask_args(mask: Optional[torch.Tensor], q: torch.Tensor,
              lk: int) -> Tuple[int, torch.Tensor, Tuple[int, ...]]:
    """(MASK_KIND, pointer argument, 4 strides) for an optional 4-D mask broadcastable to
    (B, Hq, Lq, Lk): the strides of its broadcast view (0 along broadcast dimensions, nothing copied).
    Bool masks are read as uint8; with no mask, q stands in as a pointer that is never read."""
    if mask is None:
        return NO_MASK, q, (0, 0, 0, 0)
    b, h, lq, _ = q.shape
    mask = mask.expand(b, h, lq, lk)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
        return BOOL_MASK, mask, mask.stride()
    return FLOAT_MASK, mask, mask.stride()


def lse_shape(b: int, h: int, lq: int, float_mask: bool) -> Tuple[int, ...]:
    """The shape of the forward's log-sum-exp output (see attention_fwd)."""
    return (2, b, h, lq) if float_mask else (b, h, lq)


def split_lse(lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, rounding residual) of the forward's lse; without a float mask there is no
    residual and the log-sum-exp stands in as the (unread) pointer."""
    return (lse[0], lse[1]) if lse.dim() == 4 else (lse, lse)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float, is_causal: bool, causal_offset: int, allow_tf32: bool = False,
                  dropout_p: float = 0.0, dropout_seed: int = 0,
                  deterministic: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q (B, Hq, Lq, E), k (B, Hk, Lk, E), v (B, Hk, Lk, Ev) any strides;
    mask None, or a bool or float 4-D tensor broadcastable to (B, Hq, Lq, Lk) (read through strides).
    ``dropout_p`` > 0 drops attention weights by Philox draws from ``dropout_seed`` (see
    dropout_keep_mask for the exact mask). ``deterministic`` takes the first tile config instead of
    the timed fastest (see tuning.enabled), so the result's bits do not depend on a timing.
    Returns out (B, Hq, Lq, Ev) contiguous in q's dtype and lse (B, Hq, Lq) fp32, the log-sum-exp of
    each row in log2 units (natural log-sum-exp * log2(e); -inf for fully-masked rows). Keeping base 2
    lets the backward recompute P = exp2(S * log2(e) - lse) with no rounding at the magnitude of the
    scores, which matters when logits are large (|S| in the hundreds). With a float mask lse is
    (2, B, Hq, Lq): [0] the log-sum-exp, [1] what its rounding lost, so that P = exp2((S - lse[0]) -
    lse[1]) stays exact for rows whose scores are near -FLT_MAX (a finfo.min mask), where the
    rounding of lse[0] swallows log2 of the row sum."""
    b, h, lq, e = q.shape
    hk, lk, ev = k.shape[1], k.shape[2], v.shape[3]
    mask_kind, mask_arg, ms = mask_args(mask, q, lk)
    out = torch.empty((b, h, lq, ev), device=q.device, dtype=q.dtype)
    lse = torch.empty(lse_shape(b, h, lq, mask_kind == FLOAT_MASK), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    lse_hi, lse_lo = split_lse(lse)
    pad_e, pad_ev = pad_head(e), pad_head(ev)
    flags = dict(HEAD_DIM=e, HEAD_DIM_V=ev, PAD_E=pad_e, PAD_EV=pad_ev,
                 IS_CAUSAL=is_causal, MASK_KIND=mask_kind, HAS_DROPOUT=dropout_p > 0.0,
                 DOT_F32=interpreting() and q.dtype == torch.bfloat16, BF16_RNE=needs_bf16_rne(q.dtype),
                 INPUT_PRECISION="tf32" if (q.dtype == torch.float32 and allow_tf32) else "ieee",
                 INT64=needs_int64(q, k, v, mask_arg if mask_kind else None, out))

    def launch(cfg):
        block_m, block_n, warps, stages = cfg
        _attn_fwd[(triton.cdiv(lq, block_m), b * h)](
            q, k, v, mask_arg, out, lse_hi, lse_lo,
            *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
            h, h // hk, lq, lk, scale * LOG2E, causal_offset,
            dropout_p, 1.0 / (1.0 - dropout_p), dropout_seed,
            BLOCK_M=block_m, BLOCK_N=block_n, EVEN_N=lk % block_n == 0, num_warps=warps, num_stages=stages,
            **flags)

    key = ("attn_fwd", q.device, q.dtype, tuple(sorted(flags.items())), bucket(lq), bucket(lk), bucket(b * h))
    # the unmasked tiles are compiled (kernels/aot.py) without GQA, whose GROUP is not a constant 1
    special = mask_kind != NO_MASK or hk != h
    launch(pick(key, launch_configs(q, pad_e, pad_ev, dropout_p > 0.0, special), launch, deterministic=deterministic))
    return out, lse


# One program writes the dropout keep-mask of a BLOCK_M x BLOCK_N tile of one (batch, head): the
# draws the attention kernels make, materialised (for tests and for users checking a result).
@triton.jit
def _attn_dropout_mask(Keep, Lq, Lk, dropout_p, dropout_seed,   # Keep (B * Hq, Lq, Lk) uint8
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    off_bh = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(dropout_seed, off_bh, rows, cols, Lq, Lk, dropout_p)
    tl.store(Keep + off_bh * Lq * Lk + rows[:, None].to(tl.int64) * Lk + cols[None, :], keep.to(tl.uint8),
             mask=(rows[:, None] < Lq) & (cols[None, :] < Lk))


def dropout_keep_mask(seed: int, b: int, h: int, lq: int, lk: int, dropout_p: float,
                      device: torch.device) -> torch.Tensor:
    """The bool keep-mask (B, Hq, Lq, Lk) that attention_fwd/attention_bwd apply for ``seed``."""
    keep = torch.empty((b, h, lq, lk), device=device, dtype=torch.uint8)
    if keep.numel():
        _attn_dropout_mask[(triton.cdiv(lq, 32), triton.cdiv(lk, 32), b * h)](
            keep, lq, lk, dropout_p, seed, BLOCK_M=32, BLOCK_N=32)
    return keep.bool()


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

#: The kernel variants compiled ahead of time: (IS_CAUSAL, MASK_KIND, HAS_DROPOUT, name suffix). The
#: causal float-mask variants carry the most live state (they bound registers and spills); the plain
#: one is the fast path. Every tile candidate is compiled in each, for fp16, bf16 and fp32.
AOT_VARIANTS = ((False, NO_MASK, False, ""), (True, FLOAT_MASK, False, ",causal,fmask"),
                (True, FLOAT_MASK, True, ",causal,fmask,dropout"))


#: The variants FWD_CONFIGS_UNMASKED serves, compiled for each of its candidates (names get ",nomask").
UNMASKED_AOT_VARIANTS = ((False, NO_MASK, False, ",nomask"), (True, NO_MASK, False, ",causal,nomask"))


def wgmma_expected(dtype: torch.dtype, dot_m: int, num_warps: int) -> bool:
    """Hopper's warpgroup MMA takes 16-bit operands (fp32 here runs as ieee on CUDA cores) and 64 rows
    per warpgroup of 4 warps."""
    return dtype != torch.float32 and dot_m >= 64 and num_warps >= 4


def aot_core(tname: str, e: int, causal: bool, dropout: bool = False, first: bool = True) -> bool:
    """Compiled by every ``make test``: the default (first) candidate of each tile set in the causal
    float-mask variant, in fp16 and fp32 (bf16 has fp16's sizes; it is core at head size 128 only),
    and its dropout variant in fp16 at head size 128. The rest runs with --runslow."""
    if not first:
        return False
    if dropout:
        return tname == "fp16" and e == 128
    return causal and (tname != "bf16" or e == 128)


def aot_matrix(configs, dropout_tile=with_dropout, variants=AOT_VARIANTS):
    """(dtype, triton dtype name, head size, config, variant, is-first-candidate, target caps) for every
    candidate of a per-cap config table in every variant; the dropout variant takes
    ``dropout_tile(config)``. A config listed for several caps appears once, targeting all of them."""
    caps = sorted(configs)
    for dtype, tname in _TRITON_DTYPE.items():
        cls = dtype_class(dtype)
        for e in sorted({e for cap in caps for e in configs[cap].get(cls, {})}):
            for variant in variants:
                targets: dict = {}
                firsts = set()
                for cap in caps:
                    tiles = _unique([dropout_tile(c) if variant[2] else c for c in configs[cap].get(cls, {}).get(e, [])])
                    if not tiles:
                        continue
                    firsts.add(tiles[0])
                    for cfg in tiles:
                        targets.setdefault(cfg, []).append(cap)
                for cfg, on in targets.items():
                    yield dtype, tname, e, cfg, variant, cfg in firsts, tuple(on)


#: The problems whose launches the compile gate records (kernels/aot.py: a config is compiled as the
#: launcher launches it on them): "aligned", L = 16384 with the head size of its column (strides and
#: lengths divisible by 16); "unaligned", L = 1000 with a head size below the column's that is not a
#: multiple of 16 (masked head dims, unaligned strides: the other specialisation a launch gets);
#: "ragged", L = 1000 with the column's head size (for tables that only serve that head size).
AOT_LENGTHS = {"aligned": 16384, "unaligned": 1000}
RAGGED_LENGTH = 1000
AOT_UNALIGNED_HEAD = {64: 40, 128: 72, 256: 136}
AOT_HEADS = 2


def aot_problem(dtype: torch.dtype, col: int, shape: str, float_mask: bool):
    """(q, k, v, mask) meta tensors (B = 1, Hq = Hk = AOT_HEADS) of one AOT problem (AOT_LENGTHS)
    for the head-size column ``col``; the mask, if any, a broadcast (1, 1, L, L) float mask."""
    e = AOT_UNALIGNED_HEAD[col] if shape == "unaligned" else col
    length = RAGGED_LENGTH if shape == "ragged" else AOT_LENGTHS[shape]
    q, k, v = (torch.empty(1, AOT_HEADS, length, e, device="meta", dtype=dtype) for _ in range(3))
    mask = torch.empty(1, 1, length, length, device="meta", dtype=dtype) if float_mask else None
    return q, k, v, mask


def aot_name(kernel: str, tname: str, col: int, shape: str, cfg, suffix: str) -> str:
    bm, bn, w, st = cfg
    head = {"aligned": f"E{col}", "unaligned": f"E{AOT_UNALIGNED_HEAD[col]},L{AOT_LENGTHS['unaligned']}",
            "ragged": f"E{col},L{RAGGED_LENGTH}"}[shape]
    return f"{kernel}[{tname},{head},{bm}x{bn},w{w},s{st}{suffix}]"


def _fwd_launch(dtype, col, shape, cfg, causal, mask_kind, dropout):
    def call():
        q, k, v, mask = aot_problem(dtype, col, shape, mask_kind == FLOAT_MASK)
        with forced({"attn_fwd": cfg}):
            attention_fwd(q, k, v, mask, q.shape[-1] ** -0.5, causal, 0, False, 0.1 if dropout else 0.0, 1)
    return call


def _aot_cases():
    """Every forward candidate in every AOT variant, compiled as launched on the aligned problem; the
    core ones (aot_core) on the unaligned problem too."""
    cases = []
    matrix = list(aot_matrix(FWD_CONFIGS))
    matrix += [(*row[:4], row[4], row[5] and row[4][0], row[6])  # core: the causal one
               for row in aot_matrix(FWD_CONFIGS_UNMASKED, variants=UNMASKED_AOT_VARIANTS)]
    for dtype, tname, e, cfg, variant, first, caps in matrix:
        causal, mask_kind, dropout, suffix = variant
        core = aot_core(tname, e, causal, dropout, first) or (first and mask_kind == NO_MASK and causal)
        for shape in AOT_LENGTHS if core else ("aligned",):
            cases.append(AOTCase(aot_name("attn_fwd", tname, e, shape, cfg, suffix), _attn_fwd,
                                 launch=_fwd_launch(dtype, e, shape, cfg, causal, mask_kind, dropout),
                                 num_warps=cfg[2], num_stages=cfg[3], uses_dot=True,
                                 expect_wgmma=wgmma_expected(dtype, cfg[0], cfg[2]), core=core, targets=caps))
    cases.append(AOTCase("attn_dropout_mask[32x32]", _attn_dropout_mask, num_warps=4, num_stages=3,
                         launch=lambda: dropout_keep_mask(1, 1, AOT_HEADS, 1000, 1000, 0.1, torch.device("meta"))))
    return cases


AOT_CASES = _aot_cases()
