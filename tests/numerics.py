"""The one numerics helper every test uses (DESIGN.md section 5): the fast op's error against the
float64 reference must be at most twice the same-dtype reference's error plus a floor. The rule
itself lives in attn_fast.numerics (``verify`` and the benchmark runner use it too)."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from attn_fast.numerics import Comparison, compare

__all__ = ["assert_close", "check_op", "rand", "poison", "poison_allocations"]


def rand(*shape, dtype=torch.float32, device="cpu", scale: float = 1.0) -> Tensor:
    """Random normal values (never zeros), drawn in float64 then cast, so every dtype sees the same
    numbers up to rounding."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def poison(t: Tensor) -> Tensor:
    """Fill ``t`` with NaN in place (an output buffer a kernel must overwrite)."""
    return t.fill_(float("nan"))


def poison_allocations(monkeypatch) -> None:
    """Make every ``torch.empty``/``torch.empty_like`` start as NaN (for the test using
    ``monkeypatch``): an output element a kernel never writes then fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t: Tensor) -> Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


def assert_close(fast: Tensor, ref64: Tensor, ref_lp: Tensor, name: str = "output", *,
                 dtype: Optional[torch.dtype] = None, tf32: bool = False) -> Comparison:
    """Assert the numerics rule for one tensor; returns the comparison for further checks."""
    result = compare(fast, ref64, ref_lp, name=name, dtype=dtype, tf32=tf32)
    assert result.passed, str(result)
    return result


def _clone_inputs(inputs: Dict[str, object], dtype: Optional[torch.dtype], grad: Iterable[str]):
    grad = set(grad)
    out = {}
    for k, v in inputs.items():
        if isinstance(v, Tensor):
            v = v.detach()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            v = v.clone().requires_grad_(k in grad)
        out[k] = v
    return out


def check_op(fast: Callable[..., Tensor], reference: Callable[..., Tensor], inputs: Dict[str, object],
             *, grad: Sequence[str] = (), dtype: Optional[torch.dtype] = None, tf32: bool = False,
             outputs: Callable[[object], Tuple[Tensor, ...]] = lambda y: (y,)) -> Dict[str, Comparison]:
    """Run ``fast`` and ``reference`` on ``inputs`` (keyword arguments; the floating tensors are in
    the test's dtype) and check every output and, for the names in ``grad``, every input gradient
    under one shared random output gradient. ``reference`` also runs on float64 copies."""
    dtype = dtype or next(v.dtype for v in inputs.values() if isinstance(v, Tensor) and v.is_floating_point())
    runs = {}
    for label, fn, run_dtype in (("fast", fast, None), ("lp", reference, None), ("64", reference, torch.float64)):
        args = _clone_inputs(inputs, run_dtype, grad)
        runs[label] = (args, outputs(fn(**args)))
    results = {}
    outs64 = runs["64"][1]
    for i, (yf, y64, ylp) in enumerate(zip(runs["fast"][1], outs64, runs["lp"][1])):
        results[f"out{i}"] = assert_close(yf, y64, ylp, f"output {i}", dtype=dtype, tf32=tf32)
    if grad:
        gouts = [torch.randn(y.shape, dtype=torch.float64, device=y.device) for y in outs64]
        for label, (args, outs) in runs.items():
            torch.autograd.backward([y for y in outs], [g.to(y.dtype) for g, y in zip(gouts, outs)])
        for name in grad:
            g = [runs[label][0][name].grad for label in ("fast", "64", "lp")]
            assert all(t is not None for t in g), f"no gradient for {name}"
            results[f"grad_{name}"] = assert_close(*g, f"grad {name}", dtype=dtype, tf32=tf32)
    return results
