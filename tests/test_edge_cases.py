"""Edge cases of every op, on the kernel path (the Triton kernels; interpreted on the CPU here), on
the reference path (the PyTorch reference, ``set_backend("reference")``) and on the CPU path
(``set_backend("cpu")``: torch's fused CPU kernels for attention, the reference for the rest): empty and size-1 dimensions, very
large logits, NaN/Inf inputs, fully-masked rows, -inf mask entries, non-contiguous, expanded and
overlapping inputs, and element offsets beyond 2**31.

The defined result of each case is the "Edge cases" table of README.md; where it is a choice it
follows ``torch.nn.functional.scaled_dot_product_attention``. Unless a test says otherwise, results
are judged against the float64 reference by the numerics rule (tests/numerics.py), non-finite
values included: NaN and +-inf must sit exactly where the float64 reference has them.

Every test asserts that the path it claims ran: on the kernel path the op routes to Triton and the
expected kernels were launched (launches are counted), on the CPU path no kernel was launched.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from triton.runtime.jit import KernelInterface

import attn_fast
from attn_fast import dispatch, reference
from attn_fast.kernels import attention_bwd, attention_fwd
from attn_fast.kernels import cbam as cbam_kernels
from attn_fast.kernels import squeeze_excite as se_kernels
from attn_fast.numerics import FLOORS
from numerics import assert_close, poison_allocations, rand

pytestmark = [
    # a silent fallback from the kernels to the reference is an error here
    pytest.mark.filterwarnings("error:attn_fast:RuntimeWarning"),
    # numpy (the interpreter) warns about the NaN/inf arithmetic these tests ask for
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

KERNEL, CPU, CPU_PATH = "kernel", "cpu", "cpu_path"  # CPU: the reference backend
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SDPA_GRADS = ("query", "key", "value")
INF, NAN = float("inf"), float("nan")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------
# Which path ran
# ---------------------------------------------------------------------------------------------------

#: Op -> (public function, reference, dispatch name, a forward kernel, a backward kernel).
OPS = {
    "sdpa": (attn_fast.scaled_dot_product_attention, reference.scaled_dot_product_attention,
             "scaled_dot_product_attention", "_attn_fwd", "_attn_bwd_dq"),
    "se": (attn_fast.squeeze_excite, reference.squeeze_excite, "squeeze_excite", "_se_scale", "_se_bwd_dx"),
    "eca": (attn_fast.efficient_channel_attention, reference.efficient_channel_attention,
            "efficient_channel_attention", "_eca_conv", "_se_bwd_dx"),
    "cbam": (attn_fast.cbam, reference.cbam, "cbam", "_cbam_apply", "_cbam_bwd_dx"),
}


@pytest.fixture
def launches():
    """Launches per kernel name while the test runs: every Triton kernel object of attn_fast.kernels
    gets an instance ``run`` that counts (a launch ``kernel[grid](...)`` calls ``kernel.run``)."""
    counts: Dict[str, int] = {}
    undo = []
    seen = set()
    for module in (attention_fwd, attention_bwd, se_kernels, cbam_kernels):
        for name, obj in vars(module).items():
            if not isinstance(obj, KernelInterface) or id(obj) in seen:
                continue
            seen.add(id(obj))
            own = vars(obj).get("run")
            original = obj.run

            def run(*args, _name=name, _original=original, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _original(*args, **kwargs)

            obj.run = run
            undo.append((obj, own))
    try:
        yield counts
    finally:
        for obj, own in undo:
            if own is None:
                vars(obj).pop("run", None)
            else:
                obj.run = own


@dataclass
class Path:
    """The path a test runs on, and the check that it really ran."""

    name: str
    launches: Dict[str, int]

    def ran(self, op: str, dtype: torch.dtype, *, forward: bool = True, backward: bool = True) -> None:
        """Kernel path: the op routes to Triton and its forward (and backward) kernels were launched
        (``forward=False``: nothing to launch, e.g. an empty output). CPU path: no kernel ran."""
        _, _, name, fwd_kernel, bwd_kernel = OPS[op]
        r = dispatch.route(name, torch.device("cpu"), dtype, warn=False)
        if self.name == KERNEL:
            assert r.path == "triton", r.reason
            if forward:
                assert self.launches.get(fwd_kernel, 0) > 0, f"{fwd_kernel} never ran: {self.launches}"
            if forward and backward:
                assert self.launches.get(bwd_kernel, 0) > 0, f"{bwd_kernel} never ran: {self.launches}"
        else:
            want = "cpu" if self.name == CPU_PATH and dispatch.CPU_PATHS[name] else "reference"
            assert r.path == want, r.reason
            assert not self.launches, f"the CPU path launched Triton kernels: {self.launches}"


@pytest.fixture(params=[KERNEL, CPU, CPU_PATH])
def path(request, launches, monkeypatch):
    """Each test runs on the kernel path (outputs the launchers allocate start as NaN, so an element
    a kernel never writes fails) and on the CPU path (the reference backend)."""
    if request.param == CPU:
        attn_fast.set_backend("reference")
    elif request.param == CPU_PATH:
        attn_fast.set_backend("cpu")
    else:
        poison_allocations(monkeypatch)
    return Path(request.param, launches)


# ---------------------------------------------------------------------------------------------------
# One comparison: the op against the reference in the dtype and in float64
# ---------------------------------------------------------------------------------------------------

def run_case(fast: Callable, ref: Callable, inputs: Dict[str, object], *, dtype: torch.dtype,
             grad: Sequence[str] = (), view: Optional[Callable[[Dict[str, object]], Dict[str, object]]] = None,
             contiguous_ref: bool = False, gout_view: Optional[Callable[[Tensor], Tensor]] = None,
             seed: int = 1234) -> Dict[str, tuple]:
    """Run ``fast`` and ``ref`` (in ``dtype`` and in float64) forward and backward.

    ``inputs``: keyword arguments; floating tensors are float64 values, cast to ``dtype`` (the
    float64 run gets the cast values upcast again, as check_op). ``view(kwargs)`` then turns them
    into what the op receives (strided views, NaN insertions...); the tensors named in ``grad`` are
    made leaves there (a leaf may be a view), so their gradients have the shapes the op saw. With
    ``contiguous_ref`` the reference runs on ``.contiguous()`` copies of every tensor. One random
    upstream gradient (``gout_view`` may restride it) is shared by the three runs.
    Returns {label: (kwargs, output)} for "fast", "lp" and "64"; nothing is asserted.
    """
    runs = {}
    gout64 = None
    for label, fn, upcast in (("fast", fast, False), ("lp", ref, False), ("64", ref, True)):
        args = {}
        for name, value in inputs.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                value = value.to(dtype)
                value = value.double() if upcast else value
            args[name] = value
        if view is not None:
            args = view(args)
        for name in grad:
            args[name] = args[name].detach().requires_grad_(True)
        call = {k: (v.contiguous() if contiguous_ref and fn is ref and isinstance(v, Tensor) else v)
                for k, v in args.items()}
        out = fn(**call)
        if grad:
            if gout64 is None:
                gen = torch.Generator().manual_seed(seed)
                gout64 = torch.randn(out.shape, dtype=torch.float64, generator=gen)
            g = gout64.to(dtype).to(out.dtype)  # the same (dtype-rounded) values in every run
            out.backward(gout_view(g) if gout_view is not None else g)
        runs[label] = (args, out)
    return runs


def judge(runs: Dict[str, tuple], dtype: torch.dtype, grad: Sequence[str] = ()) -> None:
    """The numerics rule (NaN/inf positions included) for the output, then for each gradient, which
    must also have its input's shape."""
    (a_fast, y_fast), (a_64, y_64), (a_lp, y_lp) = runs["fast"], runs["64"], runs["lp"]
    assert y_fast.dtype == dtype
    assert_close(y_fast, y_64, y_lp, "output", dtype=dtype)
    for name in grad:
        g_fast, g_64, g_lp = a_fast[name].grad, a_64[name].grad, a_lp[name].grad
        assert g_fast is not None, f"no gradient for {name}"
        assert g_fast.shape == a_fast[name].shape and g_fast.dtype == a_fast[name].dtype, name
        assert_close(g_fast, g_64, g_lp, f"grad {name}", dtype=dtype)


def _pattern(t: Tensor) -> Tensor:
    t = t.detach()
    return torch.stack([torch.isnan(t), torch.isposinf(t), torch.isneginf(t)])


def assert_nonfinite_close(fast: Tensor, ref64: Tensor, ref_lp: Tensor, name: str, dtype: torch.dtype) -> None:
    """The numerics rule with non-finite values: NaN, +inf and -inf where the float64 reference has
    them, at every element where the same-dtype reference has the same kind of value as the float64
    one (elsewhere the pattern is the arithmetic library's choice, e.g. whether a BLAS kernel
    multiplies 0 by inf, and nothing defines it), and the rule on the elements finite in all."""
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    f, r, lp = _pattern(fast), _pattern(ref64), _pattern(ref_lp)
    defined = (r == lp).all(0)
    wrong = (f != r).any(0) & defined
    assert not wrong.any(), (f"{name}: {int(wrong.sum())} elements are NaN/inf in one of the op and the float64 "
                             f"reference but not in the other (op: {int(f[0].sum())} NaN, {int(f[1:].sum())} inf; "
                             f"reference: {int(r[0].sum())} NaN, {int(r[1:].sum())} inf)")
    finite = defined & torch.isfinite(ref64.detach()) & torch.isfinite(ref_lp.detach())
    if finite.any():
        assert_close(fast.detach()[finite], ref64.detach()[finite], ref_lp.detach()[finite], name, dtype=dtype)


def check(op: str, inputs: Dict[str, object], *, dtype: torch.dtype, grad: Sequence[str] = (), **kw):
    """run_case then judge for one of OPS; returns the runs."""
    fast, ref = OPS[op][:2]
    runs = run_case(fast, ref, inputs, dtype=dtype, grad=grad, **kw)
    judge(runs, dtype, grad)
    return runs


def sdpa_inputs(b, h, lq, lk, e, ev=None, hk=None) -> Dict[str, Tensor]:
    f64 = torch.float64
    return dict(query=rand(b, h, lq, e, dtype=f64), key=rand(b, hk or h, lk, e, dtype=f64),
                value=rand(b, hk or h, lk, ev or e, dtype=f64))


def channel_inputs(op: str, n: int, c: int, hh: int, ww: int, cr: int = 3, k: int = 3) -> Dict[str, Tensor]:
    """float64 inputs of SE (two fcs with biases), ECA or CBAM (biases, no BatchNorm)."""
    f64 = torch.float64
    x = rand(n, c, hh, ww, dtype=f64)
    if op == "se":
        return dict(x=x, fc1_weight=rand(cr, c, dtype=f64, scale=0.3), fc1_bias=rand(cr, dtype=f64),
                    fc2_weight=rand(c, cr, dtype=f64, scale=0.3), fc2_bias=rand(c, dtype=f64))
    if op == "eca":
        return dict(x=x, conv_weight=rand(k, dtype=f64, scale=0.5))
    return dict(x=x, fc1_weight=rand(cr, c, dtype=f64, scale=0.3), fc2_weight=rand(c, cr, dtype=f64, scale=0.3),
                conv_weight=rand(1, 2, k, k, dtype=f64, scale=0.3), fc1_bias=rand(cr, dtype=f64),
                fc2_bias=rand(c, dtype=f64), conv_bias=rand(1, dtype=f64))


def tensor_names(inputs: Dict[str, object]) -> tuple:
    return tuple(k for k, v in inputs.items() if isinstance(v, Tensor) and v.is_floating_point())


# ---------------------------------------------------------------------------------------------------
# 1. Empty dimensions
# ---------------------------------------------------------------------------------------------------

SDPA_EMPTY = {"batch0": (0, 2, 5, 7), "heads0": (2, 0, 5, 7), "lq0": (2, 2, 0, 7), "lk0": (2, 2, 5, 0)}


@pytest.mark.parametrize("case", SDPA_EMPTY)
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_sdpa_empty_dimension(case, dtype, path):
    """B, H, Lq or Lk = 0, as torch's SDPA: the output has shape (B, H, Lq, Ev) (empty, or all zeros
    when only Lk = 0: a query with no key attends to nothing, like a fully-masked row); q, k, v get
    zero gradients of their shapes. A float mask (B, H, Lq, Lk) gets a zero gradient of its shape
    (torch returns None for it in this case; zeros are the same update)."""
    b, h, lq, lk = SDPA_EMPTY[case]
    ours = [rand(b, h, lq, 8, dtype=dtype), rand(b, h, lk, 8, dtype=dtype), rand(b, h, lk, 6, dtype=dtype),
            rand(b, h, lq, lk, dtype=dtype)]
    theirs = [t.clone().requires_grad_(True) for t in ours]
    ours = [t.requires_grad_(True) for t in ours]
    out = attn_fast.scaled_dot_product_attention(*ours[:3], attn_mask=ours[3])
    expected = F.scaled_dot_product_attention(*theirs[:3], attn_mask=theirs[3])
    assert out.shape == expected.shape == (b, h, lq, 6) and out.dtype == dtype
    assert torch.equal(out, expected)  # empty, or zeros
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    out.backward(g)
    expected.backward(g)
    for mine, torchs in zip(ours, theirs):
        assert mine.grad is not None and mine.grad.shape == mine.shape and mine.grad.dtype == dtype
        assert torch.equal(mine.grad, torch.zeros_like(mine))
        if torchs.grad is not None:
            assert torch.equal(mine.grad, torchs.grad)
    # causal, both alignments, no mask
    for alignment in ("top_left", "lower_right"):
        y = attn_fast.scaled_dot_product_attention(*(t.detach() for t in ours[:3]), is_causal=True,
                                                   causal_alignment=alignment)
        assert y.shape == (b, h, lq, 6) and torch.equal(y, torch.zeros_like(y))
    path.ran("sdpa", dtype, forward=case == "lk0", backward=False)


@pytest.mark.parametrize("op", ["se", "eca", "cbam"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
def test_channel_ops_batch0(op, dtype, path):
    """N = 0: the output is empty with x's shape (0, C, H, W); dx is empty with x's shape and every
    parameter gets a zero gradient of its own shape (a sum over no samples), as autograd through the
    reference gives."""
    inputs = channel_inputs(op, 0, 6, 3, 4)
    runs = check(op, inputs, dtype=dtype, grad=tensor_names(inputs))
    args, y = runs["fast"]
    assert y.shape == (0, 6, 3, 4)
    for name in tensor_names(inputs):
        assert torch.equal(args[name].grad, torch.zeros_like(args[name])), name
    path.ran(op, dtype, forward=False)


# ---------------------------------------------------------------------------------------------------
# 2. Size-1 dimensions
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=dtype_id)
def test_sdpa_length_one_and_head_size_one(dtype, path):
    """Lq = Lk = 1 (the softmax of one score is 1: output = value, exactly, and dq = dk = 0), head
    sizes E = Ev = 1, and both together; plain, causal in both alignments, and with a float mask and
    its gradient."""
    grads = SDPA_GRADS + ("attn_mask",)
    runs = check("sdpa", {**sdpa_inputs(1, 2, 1, 1, 1), "attn_mask": rand(1, 2, 1, 1, dtype=torch.float64)},
                 dtype=dtype, grad=grads)
    args, out = runs["fast"]
    assert torch.equal(out, args["value"].detach())
    check("sdpa", sdpa_inputs(1, 1, 1, 1, 16, ev=24), dtype=dtype, grad=SDPA_GRADS, view=lambda a: {
        **a, "is_causal": True})
    for alignment in ("top_left", "lower_right"):
        check("sdpa", sdpa_inputs(1, 1, 7, 9, 1), dtype=dtype, grad=SDPA_GRADS,
              view=lambda a: {**a, "is_causal": True, "causal_alignment": alignment})
    path.ran("sdpa", dtype)


@pytest.mark.parametrize("op", ["se", "eca", "cbam"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_channel_ops_one_position(op, dtype, path):
    """H * W = 1: the pools are the value itself (SE with pool="avgmax": mean and max tie); CBAM's
    spatial conv sees a 1 x 1 map (only its centre tap matters)."""
    inputs = channel_inputs(op, 3, 6, 1, 1)
    extra = {"pool": "avgmax"} if op == "se" else {}
    check(op, inputs, dtype=dtype, grad=tensor_names(inputs), view=lambda a: {**a, **extra})
    path.ran(op, dtype)


# ---------------------------------------------------------------------------------------------------
# 3. Very large logits
# ---------------------------------------------------------------------------------------------------

def _large_logit_inputs(kind: str) -> Dict[str, Tensor]:
    """float64 (1, 1, 24, 16) inputs whose scores reach about 1e4 in magnitude.
    peaked: random q, k scaled so max |q.k * scale| = 1e4 (rows are one-hot);
    flat: q, k = 200 e0 + small noise, every score within a few units of 1e4 (the softmax must
    resolve O(1) differences between scores of 1e4);
    mask: ordinary q, k plus a float mask of random values times 1e4."""
    torch.manual_seed(11)
    f64 = torch.float64
    inputs = sdpa_inputs(1, 1, 24, 24, 16)
    if kind == "peaked":
        s = inputs["query"] @ inputs["key"].transpose(-1, -2) * 0.25
        f = math.sqrt(1e4 / float(s.abs().max()))
        inputs["query"] = inputs["query"] * f
        inputs["key"] = inputs["key"] * f
    elif kind == "flat":
        for name in ("query", "key"):
            t = inputs[name] * 0.03
            t[..., 0] += 200.0
            inputs[name] = t
    else:
        inputs["attn_mask"] = rand(1, 1, 24, 24, dtype=f64) * 1e4
    return inputs


def _large_logit_bounds(args: Dict[str, Tensor], g: Tensor, dtype: torch.dtype) -> Dict[str, Tensor]:
    """Element-wise first-order error bounds (float64) of the kernels' output and gradients at large
    scores, from their arithmetic: each score is an fp32 dot product of E terms, scaled (and shifted
    by the mask) in fp32, so it carries an error up to S = (E + 3) u32 (sum |q_d k_d| scale + |mask|);
    P = softmax(S) then errs by |dP_ij| <= P_ij ((1 - P_ij) S_ij + sum_k!=j P_ik S_ik) (only score
    differences matter); 16-bit kernels round P and dS to the dtype before their dot products and
    compute delta = rowsum(dO * O) from O rounded to the dtype (as FlashAttention); every fp32 sum of
    n terms errs by up to (n + 2) u32 sum |terms|; every result is rounded to the dtype (unit
    roundoff u) once."""
    q, k, v = (args[n].detach().double() for n in SDPA_GRADS)
    mask = args.get("attn_mask")
    mask = None if mask is None else mask.detach().double()
    g = g.double()
    scale = q.shape[-1] ** -0.5
    e = q.shape[-1]
    u32, u = 2.0 ** -24, torch.finfo(dtype).eps / 2
    acc = (max(q.shape[-2], k.shape[-2], e, v.shape[-1]) + 2) * u32
    s = q @ k.transpose(-1, -2) * scale
    s_err = (e + 3) * u32 * (q.abs() @ k.abs().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
        s_err = s_err + 3 * u32 * mask.abs()
    p = torch.softmax(s, -1)
    ps = p * s_err
    dp_ = p * ((1 - p) * s_err + ps.sum(-1, keepdim=True) - ps)       # |error of P|
    o = p @ v
    # O = sum_j P_j v_j: score errors move it by sum_j P_j dS_j (v_j - O); P rounded to the dtype
    spread = (v.unsqueeze(-3) - o.unsqueeze(-2)).abs()                # (.., Lq, Lk, Ev): |v_j - O_i|
    out = (ps.unsqueeze(-1) * spread).sum(-2) + (u + acc) * (p @ v.abs()) + u * o.abs()
    dp = g @ v.transpose(-1, -2)
    delta = (g * o).sum(-1, keepdim=True)
    d_delta = (g.abs() * (out + u * o.abs())).sum(-1, keepdim=True) + acc * (g.abs() * o.abs()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    ds_err = dp_ * (dp - delta).abs() + p * (acc * (g.abs() @ v.abs().transpose(-1, -2)) + d_delta) + u * ds.abs()
    return dict(
        output=out,
        query=scale * ds_err @ k.abs() + acc * scale * (ds.abs() @ k.abs()) + u * (scale * ds @ k).abs(),
        key=scale * ds_err.transpose(-1, -2) @ q.abs() + acc * scale * (ds.abs().transpose(-1, -2) @ q.abs())
        + u * (scale * ds.transpose(-1, -2) @ q).abs(),
        value=(dp_ + (u + acc) * p).transpose(-1, -2) @ g.abs() + u * (p.transpose(-1, -2) @ g).abs(),
        attn_mask=ds_err + u * ds.abs(),
    )


@pytest.mark.parametrize("kind", ["peaked", "flat", "mask"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=dtype_id)
def test_sdpa_large_logits(kind, dtype, path):
    """Scores up to |q.k * scale + mask| ~ 1e4: output and gradients are finite (no overflow in the
    exponentials, the running max or the 16-bit casts).

    Kernel path, every dtype, and CPU path in fp32: output and gradients are within twice a
    first-order error bound of fp32 arithmetic at this magnitude (``_large_logit_bounds``) of the
    float64 reference. That explicit tolerance replaces the numerics rule because the same-dtype
    reference is no yardstick here: in fp16/bf16 it rounds scores of 1e4 to the dtype (spacing 8
    in fp16, 64 in bf16), so its error is O(1); and in the one-hot rows its softmax backward cancels
    exactly where the kernel's delta = rowsum(dO * O) cancels only to rounding. The fp32 output must
    also meet the numerics rule.

    CPU path in fp16/bf16 (the reference computing in the dtype): finite, and every output within
    the range of the values (a convex combination); its accuracy at this magnitude is the dtype's.
    """
    inputs = _large_logit_inputs(kind)
    grad = SDPA_GRADS + (("attn_mask",) if kind == "mask" else ())
    runs = run_case(*OPS["sdpa"][:2], inputs, dtype=dtype, grad=grad)
    args, out = runs["fast"]
    args64, out64 = runs["64"]
    assert torch.isfinite(out).all()
    for name in grad:
        assert torch.isfinite(args[name].grad).all(), f"grad {name} not finite"
    if path.name == CPU and dtype != F32:
        vmax = args["value"].detach().abs().amax(-2, keepdim=True).double()
        assert (out.double().abs() <= vmax * (1 + 2 * torch.finfo(dtype).eps)).all()
    else:
        if dtype == F32:
            assert_close(out, out64, runs["lp"][1], "output", dtype=dtype)
        g = torch.randn(out64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1234))
        bounds = _large_logit_bounds(args64, g.to(dtype), dtype)
        floor = FLOORS[dtype]
        for name, fast, ref in [("output", out, out64)] + [(n, args[n].grad, args64[n].grad) for n in grad]:
            err = (fast.detach().double() - ref.detach().double()).abs()
            limit = 2 * bounds[name] + floor
            worst = float((err / limit).max())
            assert worst <= 1.0, f"{name}: error reaches {worst:.2f} x the bound (max err {float(err.max()):.3e})"
    path.ran("sdpa", dtype)


# ---------------------------------------------------------------------------------------------------
# 4. NaN and Inf inputs
# ---------------------------------------------------------------------------------------------------

def _set(name: str, index, value: float, **options):
    """A view function putting ``value`` at ``args[name][index]`` (and adding options)."""
    def view(args):
        t = args[name].clone()
        t[index] = value
        return {**args, name: t, **options}
    return view


def _nan_v_at_masked_key(args):
    """NaN in v at key 3, which a bool mask hides from every query."""
    v = args["value"].clone()
    v[0, 1, 3, 5] = NAN
    mask = torch.ones(20, 20, dtype=torch.bool)
    mask[:, 3] = False
    return {**args, "value": v, "attn_mask": mask}


def _float_mask(index, value):
    def view(args):
        mask = torch.zeros(20, 20, dtype=args["query"].dtype)
        mask[index] = value
        return {**args, "attn_mask": mask}
    return view


#: case -> (heads, Lq = Lk, view, tensors whose NaN/inf pattern is implementation-defined). Lengths
#: of 20 fit one 32 x 32 interpreter tile; 40 spans two, so causal skipping of key blocks comes into
#: play. A tensor is left out where torch's own CPU backends (math, and the default flash kernel)
#: disagree with each other or with the reference on where the NaNs go (they multiply masked-out
#: weights by NaN, or not, differently): nothing defines a pattern there.
SDPA_NONFINITE = {
    "nan_in_q": (2, 20, _set("query", (0, 1, 3, 5), NAN), ()),
    "nan_in_k": (2, 20, _set("key", (0, 1, 3, 5), NAN), ()),
    "nan_in_v": (2, 20, _set("value", (0, 1, 3, 5), NAN), ()),
    "+inf_in_k": (2, 20, _set("key", (0, 1, 3, 5), INF), ("value",)),  # +inf or -inf scores by q's sign
    "+inf_in_v": (2, 20, _set("value", (0, 1, 3, 5), INF), ()),
    "nan_in_float_mask": (2, 20, _float_mask((4, 6), NAN), ()),
    "nan_in_k_hidden_by_causal_from_early_rows": (1, 40, _set("key", (0, 0, 37, 2), NAN, is_causal=True),
                                                  ("output", "query")),
    "nan_in_v_at_bool_masked_key": (2, 20, _nan_v_at_masked_key, ("key",)),
}


@pytest.mark.parametrize("case", SDPA_NONFINITE)
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_sdpa_nan_inf_propagate_as_reference(case, dtype, path):
    """A NaN or +-inf in q, k, v or a float mask propagates as in the reference (and torch's SDPA on
    the CPU): NaN/+inf/-inf at the same places of the output and of every gradient, finite entries
    by the numerics rule (tensors whose pattern torch's backends do not agree on are left out, see
    SDPA_NONFINITE). In particular: a score that is NaN or +inf poisons its whole softmax row, so
    that row's output and dq, and the whole dv of that head (every key's weight in that row is NaN);
    a -inf score is a masked key; a NaN in k at a key that the causal or bool mask hides from a row
    stays out of that row's output (the score is replaced by -inf); but a NaN (or inf) in v reaches
    every query row of its head even where its key is masked out by a mask, because the masked
    weight is 0 and 0 * NaN = NaN. (Keys past the causal diagonal: see the next test.)"""
    heads, length, view, undefined = SDPA_NONFINITE[case]
    grad = SDPA_GRADS + (("attn_mask",) if "float_mask" in case else ())
    runs = run_case(*OPS["sdpa"][:2], sdpa_inputs(1, heads, length, length, 16), dtype=dtype, grad=grad, view=view)
    assert not torch.isfinite(runs["64"][1]).all(), "the case must produce non-finite outputs"
    (a_fast, y_fast), (a_64, y_64), (a_lp, y_lp) = runs["fast"], runs["64"], runs["lp"]
    if "output" not in undefined:
        assert_nonfinite_close(y_fast, y_64, y_lp, "output", dtype)
    for name in grad:
        assert a_fast[name].grad is not None and a_fast[name].grad.shape == a_fast[name].shape
        if name not in undefined:
            assert_nonfinite_close(a_fast[name].grad, a_64[name].grad, a_lp[name].grad, f"grad {name}", dtype)
    path.ran("sdpa", dtype)


@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_sdpa_nan_in_v_past_the_causal_diagonal(dtype, path):
    """NaN in v at the last key (L = 40, causal): the one row that sees it is NaN on both paths. The
    rows that cannot see it are NaN in the reference (their weight 0 times NaN), while the kernels
    skip whole key tiles past the diagonal (as FlashAttention does), so such a row is NaN only when
    its tile reaches the key. The defined result there: every element of the output and of every
    gradient is either non-finite where the reference is, or the value it has without that key
    (the reference run with that element of v zeroed), by the numerics rule."""
    inputs = sdpa_inputs(1, 1, 40, 40, 16)
    runs = run_case(*OPS["sdpa"][:2], inputs, dtype=dtype, grad=SDPA_GRADS,
                    view=_set("value", (0, 0, 39, 2), NAN, is_causal=True))
    clean = run_case(*OPS["sdpa"][:2], inputs, dtype=dtype, grad=SDPA_GRADS,
                     view=_set("value", (0, 0, 39, 2), 0.0, is_causal=True))
    (a_fast, y_fast), (a_64, y_64) = runs["fast"], runs["64"]
    (c_64, y_c64), (c_lp, y_clp) = clean["64"], clean["lp"]
    assert torch.isnan(y_fast[0, 0, 39, 2]), "the row that sees the NaN must be NaN"
    pairs = [("output", y_fast, y_64, y_c64, y_clp)] + [
        (f"grad {n}", a_fast[n].grad, a_64[n].grad, c_64[n].grad, c_lp[n].grad) for n in SDPA_GRADS]
    for name, fast, ref_nan, ref64, ref_lp in pairs:
        fast, ref_nan = fast.detach(), ref_nan.detach()
        finite = torch.isfinite(fast)
        assert torch.isnan(fast[~finite]).all() and not torch.isfinite(ref_nan[~finite]).any(), name
        if path.name == CPU:
            assert (finite == torch.isfinite(ref_nan)).all(), name
        assert_close(fast[finite], ref64.detach()[finite], ref_lp.detach()[finite], name, dtype=dtype)
    path.ran("sdpa", dtype)


#: variant -> (op, options). The activation and gate run in the kernels for SE and ECA (CBAM's gates
#: run in PyTorch, its MLP activation in the kernels).
CHANNEL_VARIANTS = {
    "se_relu": ("se", dict(activation="relu")),
    "se_relu6_avgmax": ("se", dict(activation="relu6", pool="avgmax")),
    "se_silu_hardsigmoid": ("se", dict(activation="silu", gate="hardsigmoid")),
    "eca_sigmoid": ("eca", dict()),
    "eca_hardsigmoid": ("eca", dict(gate="hardsigmoid")),
    "cbam_relu": ("cbam", dict(activation="relu")),
    "cbam_light": ("cbam", dict(light=True)),
}


@pytest.mark.parametrize("variant", CHANNEL_VARIANTS)
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_channel_ops_nan_inf_propagate_as_reference(variant, dtype, path):
    """One NaN, +inf or -inf in x (sample 1 gets a NaN, sample 2 +inf, sample 3 -inf, sample 0
    stays finite) propagates as in the reference: NaN/+inf/-inf at the same places of the output
    and of every gradient (torch's elementwise functions propagate NaN: relu(NaN) = relu6(NaN) =
    hardswish(NaN) = hardsigmoid(NaN) = NaN, as do mean and amax), finite entries by the numerics
    rule (where the same-dtype and float64 references disagree on a NaN, e.g. a BLAS kernel's
    0 * inf in a weight gradient, nothing is asserted); sample 0 stays finite. fp16 is the 16-bit
    dtype here: torch's bfloat16 conv1d on the CPU spreads a NaN one channel further than its kernel
    reaches, which the CPU path of ECA inherits."""
    op, options = CHANNEL_VARIANTS[variant]
    inputs = channel_inputs(op, 4, 6, 3, 3, k=3)
    if options.get("light"):
        inputs["conv_weight"] = inputs["conv_weight"][:, :1]

    def view(args):
        x = args["x"].clone()
        x[1, 2, 1, 1], x[2, 4, 0, 2], x[3, 0, 2, 1] = NAN, INF, -INF
        return {**args, "x": x, **options}

    grad = tensor_names(inputs)
    runs = run_case(*OPS[op][:2], inputs, dtype=dtype, grad=grad, view=view)
    (a_fast, y_fast), (a_64, y_64), (a_lp, y_lp) = runs["fast"], runs["64"], runs["lp"]
    assert torch.isfinite(y_fast[0]).all(), "a non-finite value of another sample reached sample 0"

    def pattern(t):
        return torch.stack([torch.isnan(t), torch.isposinf(t), torch.isneginf(t)])

    for name, fast, ref in [("output", y_fast, y_64), ("dx", a_fast["x"].grad, a_64["x"].grad)]:
        wrong = [value for n, value in ((1, "NaN"), (2, "+inf"), (3, "-inf"))
                 if not torch.equal(pattern(fast[n]), pattern(ref[n]))]
        assert not wrong, f"{name}: the non-finite pattern differs from the reference's for a {', '.join(wrong)} in x"
    assert_nonfinite_close(y_fast, y_64, y_lp, "output", dtype)
    for name in grad:
        assert a_fast[name].grad.shape == a_fast[name].shape
        assert_nonfinite_close(a_fast[name].grad, a_64[name].grad, a_lp[name].grad, f"grad {name}", dtype)
    path.ran(op, dtype)


# ---------------------------------------------------------------------------------------------------
# 5. Fully-masked rows, 6. -inf entries in float masks
# ---------------------------------------------------------------------------------------------------

def _dead_rows(kind: str, dtype: torch.dtype):
    """(inputs, options view, dead-row mask (B, H, Lq)) for a kind of fully-masked rows."""
    b, h, lq, lk = 1, 2, 20, 12
    inputs = sdpa_inputs(b, h, lq, lk, 16)
    dead = torch.zeros(b, h, lq, dtype=torch.bool)
    dead[0, 1, 3] = dead[0, :, 7] = dead[:, :, 19] = True
    if kind == "bool_all_false_rows":
        mask = torch.rand(b, h, lq, lk) > 0.3
        mask[:, :, :, 0] = True
        mask[dead] = False
        inputs["attn_mask"] = mask
    elif kind == "float_all_-inf_rows":
        mask = rand(b, h, lq, lk, dtype=torch.float64)
        mask[dead] = -INF
        inputs["attn_mask"] = mask
    elif kind == "lower_right_lq_gt_lk":  # query i sees keys j <= i - (Lq - Lk): rows 0..7 see none
        dead = torch.zeros(b, h, lq, dtype=torch.bool)
        dead[:, :, : lq - lk] = True
        return inputs, dict(is_causal=True, causal_alignment="lower_right"), dead
    else:  # bool mask and causal: row 5 may attend only to keys the causal mask hides
        mask = torch.ones(b, h, lq, lk, dtype=torch.bool)
        mask[:, 1, 5, :6] = False
        dead = torch.zeros(b, h, lq, dtype=torch.bool)
        dead[:, 1, 5] = True
        inputs["attn_mask"] = mask
        return inputs, dict(is_causal=True), dead
    return inputs, {}, dead


@pytest.mark.parametrize("kind", ["bool_all_false_rows", "float_all_-inf_rows", "lower_right_lq_gt_lk",
                                  "bool_mask_and_causal"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_sdpa_fully_masked_rows(kind, dtype, path):
    """A query row whose keys are all masked out (bool mask all False, float mask all -inf, the
    causal mask in lower-right alignment with Lq > Lk, or a bool mask and the causal mask together)
    gives zeros, as torch's SDPA (>= 2.5): its output row is 0, its dq row is 0, it adds nothing to
    dk and dv, the float mask's gradient row is 0, and nothing anywhere is NaN."""
    inputs, options, dead = _dead_rows(kind, dtype)
    grad = SDPA_GRADS + (("attn_mask",) if kind.startswith("float") else ())
    runs = check("sdpa", inputs, dtype=dtype, grad=grad, view=lambda a: {**a, **options})
    args, out = runs["fast"]
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    assert torch.equal(args["query"].grad[dead], torch.zeros_like(args["query"].grad[dead]))
    for name in grad:
        assert not torch.isnan(args[name].grad).any(), name
    if "attn_mask" in grad:
        gm = args["attn_mask"].grad
        assert torch.equal(gm[dead], torch.zeros_like(gm[dead]))
    # torch's SDPA gives the same zeros (a float or bool mask; torch has no lower-right is_causal)
    if "attn_mask" in inputs and not options:
        q, k, v = (args[n].detach().float() for n in SDPA_GRADS)
        m = args["attn_mask"].detach()
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m if m.dtype == torch.bool else m.float())
        assert torch.equal(expected[dead], torch.zeros_like(expected[dead]))
    path.ran("sdpa", dtype)


@pytest.mark.parametrize("shape", [(2, 1, 20, 12), (20, 12), (2, 1, 1, 12)], ids=["full", "shared", "key_padding"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
def test_sdpa_float_mask_partial_neg_inf(shape, dtype, path):
    """-inf entries in a float mask (no row entirely -inf) mask those keys: output and q, k, v and
    mask gradients by the numerics rule, all finite; the mask's gradient is exactly 0 at its -inf
    entries (summed over the dimensions it broadcasts along)."""
    mask = rand(*shape, dtype=torch.float64)
    mask[torch.rand(shape) < 0.35] = -INF
    mask[..., 0] = 0.5  # key 0 stays visible: no row is fully masked
    inputs = {**sdpa_inputs(2, 1, 20, 12, 16), "attn_mask": mask}
    grad = SDPA_GRADS + ("attn_mask",)
    runs = check("sdpa", inputs, dtype=dtype, grad=grad, view=lambda a: {**a, "is_causal": False})
    args, out = runs["fast"]
    assert torch.isfinite(out).all()
    for name in grad:
        assert torch.isfinite(args[name].grad).all(), name
    gm = args["attn_mask"].grad
    assert gm.shape == shape and (gm[mask == -INF] == 0).all()
    path.ran("sdpa", dtype)


# ---------------------------------------------------------------------------------------------------
# 7. Non-contiguous, expanded and overlapping inputs
# ---------------------------------------------------------------------------------------------------

H, LQ, LK, E = 2, 19, 23, 16


def _sdpa_layout(layout: str):
    """(inputs, view, gout_view, grad names) for an SDPA input layout; inputs are the float64 bases,
    view makes the strided tensors the op receives."""
    f64 = torch.float64
    grad = SDPA_GRADS
    B = 2 if "expanded" in layout else 1  # noqa: N806 (batch > 1 only where a batch stride matters)
    if layout == "blhe_views":  # (B, L, H, E) tensors seen as (B, H, L, E), and a dO of that layout
        inputs = dict(query=rand(B, LQ, H, E, dtype=f64), key=rand(B, LK, H, E, dtype=f64),
                      value=rand(B, LK, H, E, dtype=f64))

        def view(a):
            return {k: t.transpose(1, 2) for k, t in a.items()}

        return inputs, view, lambda g: g.transpose(1, 2).contiguous().transpose(1, 2), grad
    if layout == "sliced_and_column_major":  # q[..., ::2], k[:, :, ::2], v column-major (E, L)^T
        inputs = dict(query=rand(B, H, LQ, 2 * E, dtype=f64), key=rand(B, H, 2 * LK, E, dtype=f64),
                      value=rand(B, H, E, LK, dtype=f64))

        def view(a):
            return dict(query=a["query"][..., ::2], key=a["key"][:, :, ::2], value=a["value"].transpose(-1, -2),
                        is_causal=True)

        return inputs, view, None, grad
    if layout == "expanded_stride0":  # k, v expanded over heads, q over the batch, a bool mask over both
        inputs = dict(query=rand(1, H, LQ, E, dtype=f64), key=rand(B, 1, LK, E, dtype=f64),
                      value=rand(B, 1, LK, E, dtype=f64))
        keep = torch.rand(LQ, LK) > 0.3
        keep[:, 0] = True

        def view(a):
            return dict(query=a["query"].expand(B, H, LQ, E), key=a["key"].expand(B, H, LK, E),
                        value=a["value"].expand(B, H, LK, E), attn_mask=keep.expand(B, H, LQ, LK))

        return inputs, view, None, grad
    if layout == "overlapping_windows":  # as_strided windows sharing elements, and a transposed float mask
        n = 3 * B + 5 * H + LK + E
        inputs = dict(query=rand(n, dtype=f64), key=rand(n, dtype=f64), value=rand(n, dtype=f64),
                      attn_mask=rand(B, H, LK, LQ, dtype=f64))

        def view(a):
            out = {k: a[k].as_strided(size, (3, 5, 1, 1)) for k, size in
                   (("query", (B, H, LQ, E)), ("key", (B, H, LK, E)), ("value", (B, H, LK, E)))}
            return {**out, "attn_mask": a["attn_mask"].transpose(-1, -2)}

        return inputs, view, None, grad + ("attn_mask",)
    if layout == "float_mask_expanded_stride0":
        inputs = {**sdpa_inputs(B, H, LQ, LK, E), "attn_mask": rand(1, 1, LQ, LK, dtype=f64)}

        def view(a):
            return {**a, "attn_mask": a["attn_mask"].expand(B, H, LQ, LK)}

        return inputs, view, None, grad + ("attn_mask",)
    # a float mask sliced along the keys, with causal
    inputs = {**sdpa_inputs(B, H, LQ, LK, E), "attn_mask": rand(B, H, LQ, 2 * LK, dtype=f64)}

    def view(a):
        return {**a, "attn_mask": a["attn_mask"][..., 1::2], "is_causal": True}

    return inputs, view, None, grad + ("attn_mask",)


@pytest.mark.parametrize("layout", ["blhe_views", "sliced_and_column_major", "expanded_stride0",
                                    "overlapping_windows", "float_mask_expanded_stride0", "float_mask_sliced"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_sdpa_strided_inputs(layout, dtype, path):
    """Transposed (B, L, H, E) views, sliced views, column-major tensors, stride-0 expanded tensors
    (k/v over heads, q over the batch, masks over batch and heads), overlapping as_strided windows
    and strided upstream gradients give what the reference gives on ``.contiguous()`` copies; each
    input's gradient has that input's shape (an expanded or overlapping input gets one gradient per
    element of the view)."""
    inputs, view, gout_view, grad = _sdpa_layout(layout)
    runs = run_case(*OPS["sdpa"][:2], inputs, dtype=dtype, grad=grad, view=view, contiguous_ref=True,
                    gout_view=gout_view)
    args = runs["fast"][0]
    strided = [k for k, t in args.items() if isinstance(t, Tensor) and not t.is_contiguous()]
    assert strided, "the case must hand the op non-contiguous tensors"
    judge(runs, dtype, grad)
    path.ran("sdpa", dtype)


def _channel_layout(layout: str, shape):
    """(base shape, view) for x of an NCHW ``shape`` in a layout."""
    n, c, hh, ww = shape
    if layout == "channels_last":
        return (n, hh, ww, c), lambda t: t.permute(0, 3, 1, 2)
    if layout == "expanded_batch_stride0":
        return (1, c, hh, ww), lambda t: t.expand(n, c, hh, ww)
    if layout == "sliced_w":
        return (n, c, hh, 2 * ww), lambda t: t[..., ::2]
    # overlapping windows: neighbouring channels share elements
    return (n * c * hh * ww,), lambda t: t.as_strided(shape, (c * hh * ww // 2, 2 * ww, ww, 1))


@pytest.mark.parametrize("layout", ["channels_last", "expanded_batch_stride0", "sliced_w", "overlapping_windows"])
@pytest.mark.parametrize("op", ["se", "eca", "cbam"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_channel_ops_strided_x(op, layout, dtype, path):
    """x as a channels_last tensor, expanded over the batch (stride 0), sliced, or as overlapping
    as_strided windows gives what the reference gives on ``x.contiguous()``; dx has x's
    shape."""
    shape = (2, 6, 4, 5)
    base, make_view = _channel_layout(layout, shape)
    inputs = channel_inputs(op, *shape)
    inputs["x"] = rand(*base, dtype=torch.float64)

    def view(a):
        return {**a, "x": make_view(a["x"])}

    runs = run_case(*OPS[op][:2], inputs, dtype=dtype, grad=tensor_names(inputs), view=view, contiguous_ref=True)
    assert runs["fast"][0]["x"].shape == shape and not runs["fast"][0]["x"].is_contiguous()
    judge(runs, dtype, tensor_names(inputs))
    path.ran(op, dtype)


def _strided_params(op: str, kind: str, inputs: Dict[str, Tensor]):
    """(inputs, view): the op's weights (kind "weights") or biases (kind "biases") as strided views."""
    inputs = dict(inputs)
    if kind == "weights":
        if op == "eca":  # (k,) sliced out of (2k,)
            inputs["conv_weight"] = rand(2 * inputs["conv_weight"].numel(), dtype=torch.float64)
            return inputs, lambda a: {**a, "conv_weight": a["conv_weight"][::2]}
        w1, w2 = inputs["fc1_weight"], inputs["fc2_weight"]
        inputs["fc1_weight"] = w1.t().contiguous()                         # (C, Cr), seen transposed
        inputs["fc2_weight"] = rand(w2.shape[0], 2 * w2.shape[1], dtype=torch.float64)  # sliced columns
        extra = {}
        if op == "cbam":
            inputs["conv_weight"] = rand(1, 2, 3, 6, dtype=torch.float64)    # (1, 2, 3, 3) sliced
            extra = {"conv_weight": lambda t: t[..., ::2]}

        def view(a):
            out = {**a, "fc1_weight": a["fc1_weight"].t(), "fc2_weight": a["fc2_weight"][:, ::2]}
            return {**out, **{k: f(a[k]) for k, f in extra.items()}}

        return inputs, view
    # biases: fc1_bias sliced out of a longer vector, fc2_bias one value expanded (stride 0)
    cr, c = inputs["fc1_bias"].numel(), inputs["fc2_bias"].numel()
    inputs["fc1_bias"] = rand(2 * cr, dtype=torch.float64)
    inputs["fc2_bias"] = rand(1, dtype=torch.float64)
    return inputs, lambda a: {**a, "fc1_bias": a["fc1_bias"][1::2], "fc2_bias": a["fc2_bias"].expand(c)}


@pytest.mark.parametrize("op,kind", [("se", "weights"), ("se", "biases"), ("eca", "weights"), ("cbam", "weights"),
                                     ("cbam", "biases")])
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_channel_ops_strided_parameters(op, kind, dtype, path):
    """Parameters given as strided views (transposed or sliced weights, a sliced bias, a bias
    expanded from one value with stride 0, ECA's kernel sliced out of a longer vector) give what the
    reference gives on contiguous copies; each gradient has its parameter's shape."""
    inputs, view = _strided_params(op, kind, channel_inputs(op, 2, 6, 3, 4))
    runs = run_case(*OPS[op][:2], inputs, dtype=dtype, grad=tensor_names(inputs), view=view, contiguous_ref=True)
    assert any(not t.is_contiguous() for t in runs["fast"][0].values() if isinstance(t, Tensor))
    judge(runs, dtype, tensor_names(inputs))
    path.ran(op, dtype)


# ---------------------------------------------------------------------------------------------------
# 8. Element offsets beyond 2**31 (in subprocesses)
# ---------------------------------------------------------------------------------------------------

#: Runs the cases named on its command line, one after the other, printing "START <case>" then
#: "RESULT <json>" for each. Each input that needs a large offset is a view with a large stride into
#: a torch.empty buffer of more than 2**31 elements (virtual memory: Linux commits only the pages
#: written, a few per row), filled through the view; the reference runs on .contiguous() copies.
_OFFSETS_SCRIPT = r'''
import json, os, resource, sys
assert os.environ.get("TRITON_INTERPRET") == "1" or __import__("torch").cuda.is_available()
import torch
import attn_fast
from attn_fast import dispatch, reference
from attn_fast.numerics import compare

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float16
G26, G27, G28 = 2 ** 26, 2 ** 27, 2 ** 28


def strided(shape, strides, dtype=DT, fill=True):
    """A view of shape/strides into a fresh buffer just large enough, filled with random values."""
    need = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    t = torch.empty(need, dtype=dtype, device=DEV).as_strided(shape, strides)
    if dtype == torch.bool:
        t.copy_(torch.rand(shape) > 0.3)
        t[..., 0] = True
    else:
        t.copy_(torch.randn(shape, dtype=torch.float64).to(dtype))
    return t


def dense(*shape, dtype=DT):
    return torch.randn(shape, dtype=torch.float64).to(dtype).to(DEV)


def sdpa_case(q, k, v, mask=None, do=None, **kw):
    return dict(fn=attn_fast.scaled_dot_product_attention, ref=reference.scaled_dot_product_attention,
                op="scaled_dot_product_attention",
                args=dict(query=q, key=k, value=v, **({} if mask is None else {"attn_mask": mask}), **kw), do=do)


def se_case(x, w1=None, **kw):
    c = x.shape[1]
    w1 = dense(3, c) if w1 is None else w1
    return dict(fn=attn_fast.squeeze_excite, ref=reference.squeeze_excite, op="squeeze_excite",
                args=dict(x=x, fc1_weight=w1, fc1_bias=dense(w1.shape[0]), fc2_weight=dense(c, w1.shape[0]),
                          fc2_bias=dense(c), **kw))


def eca_case(x):
    return dict(fn=attn_fast.efficient_channel_attention, ref=reference.efficient_channel_attention,
                op="efficient_channel_attention", args=dict(x=x, conv_weight=dense(3)))


def cbam_case(x, w2=None):
    c = x.shape[1]
    w2 = dense(c, 3) if w2 is None else w2
    return dict(fn=attn_fast.cbam, ref=reference.cbam, op="cbam",
                args=dict(x=x, fc1_weight=dense(w2.shape[1], c), fc2_weight=w2, conv_weight=dense(1, 2, 3, 3)))


CASES = {
    # attention: the row (sequence) stride of q, k, v, the mask and dO; head and batch strides
    "sdpa_q_row_stride": lambda: sdpa_case(strided((1, 1, 40, 16), (0, 0, G26, 1)), dense(1, 1, 40, 16),
                                           dense(1, 1, 40, 16)),
    "sdpa_k_row_stride": lambda: sdpa_case(dense(1, 1, 40, 16), strided((1, 1, 40, 16), (0, 0, G26, 1)),
                                           dense(1, 1, 40, 16), is_causal=True),
    "sdpa_v_row_stride": lambda: sdpa_case(dense(1, 1, 40, 16), dense(1, 1, 40, 16),
                                           strided((1, 1, 40, 16), (0, 0, G26, 1))),
    "sdpa_q_feature_stride": lambda: sdpa_case(strided((1, 1, 8, 17), (0, 0, 1, G27)), dense(1, 1, 8, 17),
                                               dense(1, 1, 8, 17)),
    "sdpa_q_head_stride": lambda: sdpa_case(strided((1, 9, 8, 16), (0, G28, 16, 1)), dense(1, 9, 8, 16),
                                            dense(1, 9, 8, 16)),
    "sdpa_q_batch_stride": lambda: sdpa_case(strided((9, 1, 8, 16), (G28, 0, 16, 1)), dense(9, 1, 8, 16),
                                             dense(9, 1, 8, 16)),
    "sdpa_kv_head_stride_gqa": lambda: sdpa_case(dense(1, 18, 8, 16), strided((1, 9, 8, 16), (0, G28, 16, 1)),
                                                 strided((1, 9, 8, 16), (0, G28, 16, 1)), enable_gqa=True),
    "sdpa_kv_batch_stride": lambda: sdpa_case(dense(9, 1, 8, 16), strided((9, 1, 8, 16), (G28, 0, 16, 1)),
                                              strided((9, 1, 8, 16), (G28, 0, 16, 1))),
    "sdpa_bool_mask_row_stride": lambda: sdpa_case(dense(1, 1, 40, 16), dense(1, 1, 40, 16), dense(1, 1, 40, 16),
                                                   mask=strided((1, 1, 40, 40), (0, 0, G26, 1), torch.bool)),
    "sdpa_float_mask_row_stride": lambda: sdpa_case(dense(1, 1, 40, 16), dense(1, 1, 40, 16), dense(1, 1, 40, 16),
                                                    mask=strided((1, 1, 40, 40), (0, 0, G26, 1))),
    "sdpa_grad_output_row_stride": lambda: sdpa_case(dense(1, 1, 40, 16), dense(1, 1, 40, 16),
                                                     dense(1, 1, 40, 16),
                                                     do=strided((1, 1, 40, 16), (0, 0, G26, 1))),
    # channel attention: x with a channel or batch stride of 2**28, an fc weight with a row stride of 2**28
    "se_x_channel_stride": lambda: se_case(strided((1, 9, 2, 3), (9 * G28, G28, 3, 1)), pool="avgmax"),
    "se_x_batch_stride": lambda: se_case(strided((9, 4, 2, 3), (G28, 6, 3, 1))),
    "se_x_channels_last_batch_stride": lambda: se_case(strided((9, 4, 2, 3), (G28, 1, 12, 4))),
    "se_fc1_weight_row_stride": lambda: se_case(dense(2, 4, 3, 3), w1=strided((9, 4), (G28, 1))),
    "eca_x_channel_stride": lambda: eca_case(strided((1, 9, 2, 3), (9 * G28, G28, 3, 1))),
    "cbam_x_channel_stride": lambda: cbam_case(strided((1, 9, 2, 3), (9 * G28, G28, 3, 1))),
    "cbam_x_batch_stride": lambda: cbam_case(strided((9, 4, 2, 3), (G28, 6, 3, 1))),
    "cbam_fc2_weight_row_stride": lambda: cbam_case(dense(2, 9, 3, 3), w2=strided((9, 3), (G28, 1))),
}


def run(name):
    torch.manual_seed(0)
    case = CASES[name]()
    route = dispatch.route(case["op"], torch.device(DEV), DT, warn=False)
    assert route.path == "triton", route.reason
    args = case["args"]
    big = [k for k, t in args.items()
           if torch.is_tensor(t) and t.untyped_storage().nbytes() // t.element_size() > 2 ** 31]
    assert big or case.get("do") is not None, "no input needs 64-bit offsets"
    grads = [k for k, t in args.items() if torch.is_tensor(t) and t.is_floating_point()]
    runs = {}
    for label, fn, dtype in (("fast", case["fn"], None), ("lp", case["ref"], None), ("64", case["ref"], torch.float64)):
        a = {}
        for k, t in args.items():
            if torch.is_tensor(t):
                t = t if label == "fast" else t.contiguous()
                t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                if k in grads:
                    t = t.detach().requires_grad_(True)
            a[k] = t
        y = fn(**a)
        do = case.get("do") if case.get("do") is not None else torch.ones_like(y)
        do = do if label == "fast" else do.contiguous()
        y.backward(do.to(y.dtype))
        runs[label] = (a, y)
    checks = [compare(runs["fast"][1], runs["64"][1], runs["lp"][1], name="output", dtype=DT)]
    for k in grads:
        checks.append(compare(runs["fast"][0][k].grad, runs["64"][0][k].grad, runs["lp"][0][k].grad,
                              name=f"grad {k}", dtype=DT))
    return dict(passed=all(c.passed for c in checks), checks=[str(c) for c in checks],
                virtual_gib=sum(t.untyped_storage().nbytes() for t in args.values() if torch.is_tensor(t)) / 2 ** 30,
                maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


for name in sys.argv[1:]:
    print("START", name, flush=True)
    try:
        result = run(name)
    except Exception as exc:  # a Python error: reported, the next case still runs
        result = dict(passed=False, checks=[f"{type(exc).__name__}: {exc}"])
    print("RESULT", json.dumps(dict(name=name, **result)), flush=True)
'''

OFFSET_CASES = ("sdpa_q_row_stride", "sdpa_k_row_stride", "sdpa_v_row_stride", "sdpa_q_feature_stride",
                "sdpa_q_head_stride", "sdpa_q_batch_stride", "sdpa_kv_head_stride_gqa", "sdpa_kv_batch_stride",
                "sdpa_bool_mask_row_stride", "sdpa_float_mask_row_stride", "sdpa_grad_output_row_stride",
                "se_x_channel_stride", "se_x_batch_stride", "se_x_channels_last_batch_stride",
                "se_fc1_weight_row_stride", "eca_x_channel_stride", "cbam_x_channel_stride", "cbam_x_batch_stride",
                "cbam_fc2_weight_row_stride")


def _run_offset_cases(cases: Sequence[str]) -> Dict[str, dict]:
    """Results of the offset cases, run in as few subprocesses as crashes allow: a case that kills
    its process (an int32 offset that wrapped around: a segfault) is recorded with the signal, and a
    fresh process goes on with the next case."""
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"), "OMP_NUM_THREADS": "1"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    results: Dict[str, dict] = {}
    todo = list(cases)
    while todo:
        proc = subprocess.run([sys.executable, "-c", _OFFSETS_SCRIPT, *todo], env=env, capture_output=True,
                              text=True, timeout=1800)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line.split(" ", 1)[1]
            elif line.startswith("RESULT "):
                result = json.loads(line.split(" ", 1)[1])
                results[result.pop("name")] = result
                started = None
        if started is None:  # every case reported, or the process died before the first one
            for c in todo:
                results.setdefault(c, dict(passed=False, checks=[
                    f"subprocess exited with {proc.returncode} before reporting: {proc.stderr[-2000:]}"]))
            break
        results[started] = dict(passed=False, returncode=proc.returncode, checks=[
            f"the subprocess died (exit status {proc.returncode}; -11 is SIGSEGV: an element offset "
            f"computed in int32 wrapped around) during this case. stderr tail: {proc.stderr[-1500:]}"])
        todo = todo[todo.index(started) + 1:]
    return results


@pytest.fixture(scope="module")
def offset_results():
    """All offset cases, run once per module (the first test that needs them runs them all)."""
    return _run_offset_cases(OFFSET_CASES)


@pytest.mark.parametrize("case", OFFSET_CASES)
def test_offsets_beyond_2_31_elements(case, offset_results):
    """An input whose elements lie more than 2**31 elements from its start (a large stride on a
    small fp16 tensor: rows 32.. of a row stride of 2**26, head or batch 8 of a stride of 2**28,
    feature 16 of a stride of 2**27, a fc weight row 8 of a stride of 2**28) gives what the
    reference gives on a contiguous copy, forward and backward, on the kernel path: every element
    offset is computed in 64 bits. Each case runs in a subprocess (a wrapped-around 32-bit offset
    reads or writes out of bounds and may crash the process). Memory: up to about 9 GiB of virtual
    memory per case, a few hundred MiB resident (pages are committed when written; fine on the
    24 GiB CI machine); the CPU path needs no such test (PyTorch indexes in 64 bits)."""
    result = offset_results[case]
    assert result["passed"], "\n".join(result["checks"])
    assert result["maxrss_mib"] < 4096, f"resident memory {result['maxrss_mib']:.0f} MiB: pages were committed"
