"""Timing, peak memory, the roofline and the correctness check of one benchmark row (DESIGN.md section 6).

* GPU: ``triton.testing.do_bench`` (median and 20th/80th percentiles of the timed calls after a
  warm-up; it writes a 256 MB buffer before every timed call, so no call finds its inputs in L2).
  Peak memory: the most bytes the caching allocator held during one call beyond what was held
  before it (inputs, weights and, for ``bwd``, the saved graph are not counted; outputs and
  workspaces are).
* CPU: ``time.perf_counter`` around single calls, the implementations of one row interleaved (A B C A
  B C ..., ``time_interleaved``) so that a load on the machine hits them alike: medians of at least
  ``min_calls`` rounds, or as many as fit in the budget, with the 20th/80th percentiles; a row whose
  p80 / p20 passes NOISY_SPREAD is flagged ``noisy``. Peak memory: the most bytes that tensors made
  by aten ops during one call held at once (``PeakLive``; buffers inside a fused kernel are not seen).

Directions: ``fwd`` times the forward on inputs that need no gradient (inference); ``bwd`` times
``out.backward(dout, retain_graph=True)`` on a graph built once; ``fwd+bwd`` times both.
"""
from __future__ import annotations

import random
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from attn_fast import reference
from attn_fast.numerics import compare

from .cases import Case
from .impls import Prepared


#: p80 / p20 of a row's CPU calls beyond which its timing is flagged noisy.
NOISY_SPREAD = 1.25


@dataclass
class Timing:
    ms: float
    ms_p20: float
    ms_p80: float
    calls: int
    best: float

    @property
    def noisy(self) -> bool:
        return self.calls > 1 and self.ms_p80 > NOISY_SPREAD * self.ms_p20


def _timing(times: List[float]) -> Timing:
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return Timing(statistics.median(times), q[0], q[3], len(times), min(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, leaves: Sequence[Tensor] = (), *,
              rep_ms: float = 100.0, warmup_ms: float = 25.0, min_calls: int = 3,
              budget_s: float = 0.25) -> Timing:
    """Median time of ``fn`` in milliseconds (gradients of ``leaves`` reset before every call)."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80, best = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(leaves),
                                                      quantiles=[0.5, 0.2, 0.8, 0.0])
        return Timing(med, p20, p80, -1, best)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < budget_s and len(times) < 1000):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _timing(times)


def time_interleaved(fns: Dict[str, Callable[[], object]], leaves: Dict[str, Sequence[Tensor]], *,
                     min_calls: int = 5, budget_s: float = 1.0) -> Dict[str, Timing]:
    """CPU: one call of each of ``fns`` per round, in turn, for at least ``min_calls`` rounds or as many
    as fit in ``budget_s`` (gradients of each one's ``leaves`` reset before its calls). Each round
    takes a fresh random order (seeded: the same every run), so each implementation follows each
    other one equally often: a call right after one that swept the caches (a math backend's Lq x Lk
    scores) runs up to 1.4x slower on a 2-core EPYC, and a fixed order (or a rotated one, which keeps
    who follows whom) would put that cost on one implementation."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns.items())
    shuffle = random.Random(0).shuffle
    start = time.perf_counter()
    rounds = 0
    while rounds < min_calls or (time.perf_counter() - start < budget_s and rounds < 1000):
        shuffle(order)
        for name, fn in order:
            for t in leaves.get(name, ()):
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: _timing(ts) for name, ts in times.items()}


class PeakLive(TorchDispatchMode):
    """The most bytes that tensors made by aten ops held at once while the mode was on: an op's
    output with fresh storage counts from its creation until that tensor is freed (a view that
    outlives its base is not followed). Buffers inside one op (a fused kernel's scratch) are not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in seen:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes allocated at the peak of one call of ``fn`` beyond those held before it: the caching
    allocator's count on a GPU, ``PeakLive`` on the CPU."""
    if device.type != "cuda":
        with PeakLive() as rec:
            fn()
        return rec.peak
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def directed(prep: Prepared, direction: str) -> Callable[[], object]:
    """The callable timed for ``direction`` (see the module docstring)."""
    if direction == "fwd":
        return prep.call
    out = prep.call()
    dout = torch.randn_like(out)
    if direction == "bwd":
        return lambda: out.backward(dout, retain_graph=True)
    if direction == "fwd+bwd":
        del out
        return lambda: prep.call().backward(dout)
    raise ValueError(f"direction must be fwd, bwd or fwd+bwd, got {direction!r}")


# ------------------------------------------------------------------------------------------ roofline
def roofline(device: torch.device) -> Dict[str, float]:
    """The machine's measured peaks: a large matmul (bf16 on a GPU, fp32 on a CPU) in FLOP/s and a
    large device-to-device copy in bytes/s (read plus write), each from its fastest call (a peak)."""
    if device.type == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, dtype, copy_bytes = 1024, torch.float32, 1 << 26
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = time_call(lambda: torch.mm(a, b), device, rep_ms=200, min_calls=10).best
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t_cp = time_call(lambda: dst.copy_(src), device, rep_ms=200, min_calls=10).best
    return {"matmul_flops": 2.0 * n ** 3 / (t_mm * 1e-3), "matmul": f"{n}x{n}x{n} {str(dtype)[6:]}",
            "copy_bytes_per_s": 2.0 * copy_bytes / (t_cp * 1e-3), "copy": f"{copy_bytes >> 20} MiB"}


def best_roofline(*measured: Dict[str, float]) -> Dict[str, float]:
    """The highest of several roofline measurements of one run, peak by peak."""
    best = dict(measured[0])
    for m in measured[1:]:
        for key in ("matmul_flops", "copy_bytes_per_s"):
            best[key] = max(best[key], m[key])
    return best


# ---------------------------------------------------------------------------------------- correctness
def _slice(case: Case, inputs: Dict[str, object]) -> Dict[str, object]:
    """A part of the problem the float64 reference can afford: one (batch, head) of attention (heads are
    independent), the first two samples of SE/CBAM."""
    keys = ("query", "key", "value") if case.family in ("attention", "decode", "cross") else ("x",)
    cut = (slice(0, 1), slice(0, 1)) if keys[0] == "query" else (slice(0, 2),)
    return {k: (v[cut].detach() if k in keys else v) for k, v in inputs.items()}


def _detached(inputs: Dict[str, object], dtype: Optional[torch.dtype] = None, grad: bool = False):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, Tensor):
            t = v.detach().clone()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[k] = t.requires_grad_(grad and t.is_floating_point() and not k.startswith("bn_running"))
        else:
            out[k] = v
    return out


def check(case: Case, inputs: Dict[str, object], ours: Callable[..., Tensor], ref: Callable[..., Tensor],
          out_full: Tensor) -> Dict[str, object]:
    """Is attn_fast still correct on this case? The output of the timed (full-size) call, sliced, and
    the gradients of a sliced problem, each against the reference in float64 by the numerics rule
    (DESIGN.md section 5). Returns the worst output and gradient comparisons."""
    part = _slice(case, inputs)
    if case.family == "cbam":
        part["bn_training"] = False  # per-sample outputs: the timed forward ran in eval mode too
    n = 1 if case.family in ("attention", "decode", "cross") else 2
    fast = out_full[:n, :1] if n == 1 else out_full[:n]
    ref64 = ref(**_detached(part, torch.float64))
    ref_lp = ref(**_detached(part))
    fwd = compare(fast, ref64, ref_lp, name="output")
    # gradients on the slice (CBAM: BatchNorm with batch statistics, as in training)
    if case.family == "cbam":
        part["bn_training"] = True
    results = {}
    runs = {"fast": (ours, _detached(part, grad=True)), "ref64": (ref, _detached(part, torch.float64, grad=True)),
            "ref_lp": (ref, _detached(part, grad=True))}
    dout = None
    for key, (fn, args) in runs.items():
        out = fn(**args)
        if dout is None:
            dout = torch.randn(out.shape, dtype=torch.float64, device=out.device)
        out.backward(dout.to(out.dtype))
        results[key] = args
    grads = [compare(t.grad, results["ref64"][name].grad, results["ref_lp"][name].grad, name=f"d{name}")
             for name, t in results["fast"].items() if isinstance(t, Tensor) and t.grad is not None]
    # the gradient nearest its bound (a failing one first)
    g = max(grads, key=lambda c: (not c.passed, c.err_fast / max(c.bound, 1e-300)))
    return {"fwd_err": fwd.err_fast, "fwd_bound": fwd.bound, "fwd_ok": bool(fwd.passed),
            "grad_name": g.name, "grad_err": g.err_fast, "grad_bound": g.bound, "grad_ok": bool(g.passed)}


REFERENCES = {"scaled_dot_product_attention": reference.scaled_dot_product_attention,
              "squeeze_excite": reference.squeeze_excite, "cbam": reference.cbam}
