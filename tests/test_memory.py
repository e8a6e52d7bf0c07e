"""Memory bounds (issue 8): attention never allocates anything of size Lq x Lk, so its memory grows
linearly in the sequence length; SE, ECA and CBAM allocate their output (and dx in the backward)
plus workspaces of O(N*C + N*H*W) elements, never another copy of x.

On the CPU the allocations are observed by a dispatch mode that sees every aten op, including those
inside attn_fast's custom ops (their bodies are run under the mode) and the launchers' own
``torch.empty`` workspaces; the Triton kernels themselves allocate nothing. On a GPU, the peak of
``torch.cuda.max_memory_allocated`` is compared at L = 4k and 16k."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import attn_fast
from attn_fast.ops import attention as attention_ops
from attn_fast.ops import cbam as cbam_ops
from attn_fast.ops import squeeze_excite as se_ops
from numerics import rand

#: The Python bodies of attn_fast's custom ops, by qualified name: the recorder runs them itself so
#: that the allocations inside the ops are seen too.
_BODIES = {op._qualname: op._init_fn for mod in (attention_ops, se_ops, cbam_ops) for op in vars(mod).values()
           if isinstance(op, torch._library.custom_ops.CustomOpDef)}


@dataclass
class Allocations(TorchDispatchMode):
    """Every tensor that an aten op creates with fresh storage: (op, shape, bytes)."""

    records: List[Tuple[str, Tuple[int, ...], int]] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _BODIES.get(func._schema.name)
        if body is not None:
            with self:
                return body(*args, **kwargs)
        out = func(*args, **kwargs)
        if func._schema.name.startswith("aten::set_"):  # re-points a tensor at an existing storage
            return out
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.records.append((str(func), tuple(t.shape), t.untyped_storage().nbytes()))
        return out

    @property
    def total(self) -> int:
        return sum(r[2] for r in self.records)


def test_recorder_sees_inside_the_ops():
    """The custom ops' bodies ran under the recorder: the launchers' workspaces are visible."""
    assert {"attn_fast::attention_fwd", "attn_fast::attention_bwd", "attn_fast::se_fwd", "attn_fast::cbam_bwd"} <= set(_BODIES)
    q = rand(1, 1, 20, 16).requires_grad_(True)
    with Allocations() as rec:
        attn_fast.scaled_dot_product_attention(q, q, q).sum().backward()
    shapes = [r[1] for r in rec.records]
    assert (1, 1, 20) in shapes       # the forward's log-sum-exp, and the backward's delta
    assert (1, 1, 20, 16) in shapes   # out, dq


def attention_allocations(lq: int, lk: int, causal: bool, mask: bool = False) -> Allocations:
    b, h, e = 1, 2, 16
    q = rand(b, h, lq, e, dtype=torch.float16).requires_grad_(True)
    k = rand(b, h, lk, e, dtype=torch.float16).requires_grad_(True)
    v = rand(b, h, lk, e, dtype=torch.float16).requires_grad_(True)
    m = rand(1, 1, 1, lk, dtype=torch.float16) if mask else None  # a padding-style (B, 1, 1, Lk) mask
    g = rand(b, h, lq, e, dtype=torch.float16)
    with Allocations() as rec:
        attn_fast.scaled_dot_product_attention(q, k, v, m, is_causal=causal).backward(g)
    return rec


@pytest.mark.parametrize("causal,mask", [(True, False), (False, True)])
def test_attention_allocates_nothing_of_size_lq_by_lk(causal, mask):
    lq, lk = 128, 192  # one head's fp16 output is 4 KiB; the Lq x Lk score matrix would be 48 KiB in fp16
    small = attention_allocations(lq, lk, causal, mask)
    big = attention_allocations(2 * lq, 2 * lk, causal, mask)
    for rec, (m, n) in ((small, (lq, lk)), (big, (2 * lq, 2 * lk))):
        largest = max(nbytes for _, _, nbytes in rec.records)
        assert largest <= 2 * 2 * max(m, n) * 16, rec.records   # B*H*L*E fp16 at most (dk, dv, out)
        assert all(math.prod(shape) < m * n for _, shape, _ in rec.records)
    # everything scales with L: doubling both lengths at most doubles what is allocated
    assert big.total <= 2 * small.total, (small.total, big.total)


def channel_allocations(op: str, shape, channels_last: bool) -> Tuple[Allocations, torch.Tensor]:
    n, c, hh, ww = shape
    cr = max(1, c // 8)
    x = rand(*shape, dtype=torch.float16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w1 = rand(cr, c, dtype=torch.float16, scale=c ** -0.5).requires_grad_(True)
    w2 = rand(c, cr, dtype=torch.float16, scale=cr ** -0.5).requires_grad_(True)
    g = rand(*shape, dtype=torch.float16)  # the upstream gradient in the other memory format than x
    g = g if channels_last else g.to(memory_format=torch.channels_last)
    with Allocations() as rec:
        if op == "se":
            y = attn_fast.squeeze_excite(x, w1, None, w2, pool="avgmax")
        elif op == "eca":
            y = attn_fast.efficient_channel_attention(x, rand(1, 1, 3, dtype=torch.float16).requires_grad_(True))
        else:
            y = attn_fast.cbam(x, w1, w2, rand(1, 2, 7, 7, dtype=torch.float16).requires_grad_(True))
        y.backward(g)
    return rec, x


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("op", ["se", "eca", "cbam"])
def test_channel_attention_workspaces(op, channels_last):
    """y and dx are the only x-sized allocations (an upstream gradient in the other memory format is
    read in place, not copied); everything else together stays within a few fp32 values per
    (sample, channel), per (sample, position) and per weight, at two shapes: many channels on a
    small map, and a large map (where partial sums per block of positions, N x blocks x C, would
    show)."""
    for shape in ((2, 96, 5, 6), (1, 160, 32, 32)):
        rec, x = channel_allocations(op, shape, channels_last)
        n, c, hh, ww = shape
        x_sized = [r for r in rec.records if r[2] >= x.numel() * x.element_size()]
        assert len(x_sized) == 2 and all(r[1] == tuple(shape) and r[2] == x.numel() * 2 for r in x_sized), x_sized
        workspace = rec.total - sum(r[2] for r in x_sized)
        params = 2 * c * max(1, c // 8) + 2 * 7 * 7
        budget = 4 * (16 * (n * c + n * hh * ww) + 8 * params)  # fp32: 16 per (n, c) and (n, hw), 8 per weight
        if hh * ww > 100:
            assert budget < x.numel() * x.element_size()  # so a copy of x could not hide in it
        assert workspace <= budget, (shape, workspace, budget, sorted(rec.records, key=lambda r: -r[2])[:6])


@pytest.mark.gpu
def test_attention_peak_memory_is_linear_in_length_on_gpu():
    """fwd + bwd peak beyond the inputs at L = 4k and 16k: 4x the length costs about 4x the memory
    (a materialised L x L matrix would cost 16x)."""
    def peak(length: int) -> int:
        q, k, v = (torch.randn(1, 8, length, 64, device="cuda", dtype=torch.float16, requires_grad=True)
                   for _ in range(3))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        attn_fast.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(1024)  # warm-up: tuning and compilation
    p4, p16 = peak(4096), peak(16384)
    assert p16 <= 4.5 * p4, (p4, p16)
    assert p16 < 16384 * 16384 * 2  # far below one head's fp16 score matrix


def test_cbam_partial_sums_are_bounded_and_right(monkeypatch):
    """CBAM's backward reductions over positions use (N, P, C) partial sums, P = programs per sample,
    each walking every P-th block of positions. With P forced down to 2 (so each program walks
    several blocks, as on a large map), the workspace has 2 rows and the gradients still pass the
    numerics rule."""
    from attn_fast import reference
    from attn_fast.kernels import cbam as cbam_kernels
    from numerics import check_op

    monkeypatch.setattr(cbam_kernels, "MIN_PARTS", 2)
    monkeypatch.setattr(cbam_kernels, "PART_PROGRAMS", 2)
    n, c, hh, ww = 2, 12, 17, 19  # 323 positions: 3 blocks of 128 (NCHW), 11 of 32 (NHWC)
    assert cbam_kernels._parts(n, hh * ww, cbam_kernels.COLUMN_TILES[False]) == 2
    for channels_last in (False, True):
        x = rand(n, c, hh, ww)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        inputs = dict(x=x, fc1_weight=rand(3, c, scale=0.3), fc2_weight=rand(c, 3, scale=0.3),
                      conv_weight=rand(1, 2, 7, 7, scale=0.2))
        check_op(attn_fast.cbam, reference.cbam, inputs, grad=tuple(inputs))
        rec, _ = channel_allocations("cbam", (n, c, hh, ww), channels_last)
        assert (n, 2, c) in [r[1] for r in rec.records]
