"""Two small kernels that exist only to prove the AOT compile harness (kernels/aot.py) measures what
it claims: a tiled fp16 matmul that must use wgmma on sm_90, and an elementwise copy that must not.
They are not part of the library."""
import triton
import triton.language as tl

from attn_fast.kernels.aot import AOTCase


# One program computes a BLOCK_M x BLOCK_N tile of C = A @ B (fp32 accumulation), reading a
# BLOCK_M x K strip of A and a K x BLOCK_N strip of B.
@triton.jit
def _probe_matmul(A, B, C, M, N, K, stride_am, stride_bk, stride_cm,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * stride_am + (k + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k + rk)[None, :] < K), other=0.0)
        b = tl.load(B + (k + rk)[:, None] * stride_bk + rn[None, :],
                    mask=((k + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


# One program copies BLOCK elements: BLOCK reads and BLOCK writes.
@triton.jit
def _probe_copy(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


_MM_SIG = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"}

AOT_CASES = [
    AOTCase("probe_matmul[128x128x64,w8,s3]", _probe_matmul, _MM_SIG,
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3, uses_dot=True),
    AOTCase("probe_copy[1024,w4]", _probe_copy, {"X": "*fp32", "Y": "*fp32", "n": "i32"},
            {"BLOCK": 1024}, num_warps=4, num_stages=1),
    # Claims a tl.dot inner loop it does not have: the harness must report the missing wgmma.
    AOTCase("probe_copy[1024,w4,claims-dot]", _probe_copy, {"X": "*fp32", "Y": "*fp32", "n": "i32"},
            {"BLOCK": 1024}, num_warps=4, num_stages=1, uses_dot=True),
]
