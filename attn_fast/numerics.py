"""The numerics rule of DESIGN.md section 5, in one place (tests, ``verify`` and the benchmark runner
all use it).

For an output or gradient ``y`` of a fast op::

    max|y_fast - y_ref64| <= 2 * max|y_ref_lp - y_ref64| + floor(dtype)

``y_ref64`` is the reference on inputs upcast to float64, ``y_ref_lp`` the reference in the input's
dtype, ``floor`` a small absolute term per dtype. Non-finite values must sit where the float64
reference has them (same NaN positions, same signed infinities); the error is taken over the rest.

The bound is never below one unit in the last place of the dtype at the output's largest magnitude
(``Comparison.ulp``): a result must be rounded to its dtype, and with few elements (a BatchNorm
weight's gradient is one number) the same-dtype reference can land on the nearest representable
value by luck, which would make the rule fail a correctly rounded answer one step away. For tensors
of many elements ``2 * max|y_ref_lp - y_ref64|`` is already about that large, so this changes nothing
there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["FLOORS", "TF32_FLOOR", "floor_for", "ulp_at", "Comparison", "compare"]

#: Absolute floor per dtype: rounding noise that the 2x rule cannot see when both errors are tiny.
FLOORS = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-3,
}
#: Floor for fp32 computed with tf32 matrix units (10-bit mantissa products).
TF32_FLOOR = 5e-3


def floor_for(dtype: torch.dtype, tf32: bool = False) -> float:
    if tf32 and dtype == torch.float32:
        return TF32_FLOOR
    try:
        return FLOORS[dtype]
    except KeyError:
        raise ValueError(f"no numerics floor for dtype {dtype}; expected one of {list(FLOORS)}") from None


@dataclass(frozen=True)
class Comparison:
    """One checked tensor: the fast op's error, the same-dtype reference's error, and the verdict."""

    name: str
    err_fast: float
    err_ref: float
    floor: float
    passed: bool
    detail: str = ""
    ulp: float = 0.0

    @property
    def bound(self) -> float:
        return max(2.0 * self.err_ref + self.floor, self.ulp)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        text = (f"{self.name}: max|fast-ref64| = {self.err_fast:.3e}, max|ref_lp-ref64| = "
                f"{self.err_ref:.3e}, bound = {self.bound:.3e} [{verdict}]")
        return f"{text} ({self.detail})" if self.detail else text


def _max_abs_diff(a: Tensor, b: Tensor, finite: Tensor) -> float:
    if not bool(finite.any()):
        return 0.0
    return float((a.double() - b)[finite].abs().max())


def ulp_at(dtype: torch.dtype, magnitude: float) -> float:
    """One unit in the last place of ``dtype`` at ``magnitude`` (0 for 0 or non-finite)."""
    if not math.isfinite(magnitude) or magnitude <= 0.0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def compare(fast: Tensor, ref64: Tensor, ref_lp: Tensor, *, name: str = "output",
            dtype: Optional[torch.dtype] = None, tf32: bool = False) -> Comparison:
    """Judge ``fast`` against the float64 reference by the rule above.

    ``dtype`` picks the floor (default: ``ref_lp.dtype``). Shapes must match exactly.
    """
    dtype = dtype or ref_lp.dtype
    floor = floor_for(dtype, tf32)
    for label, t in (("fast", fast), ("ref_lp", ref_lp)):
        if t.shape != ref64.shape:
            return Comparison(name, math.inf, math.nan, floor, False,
                              f"{label} shape {tuple(t.shape)} != reference shape {tuple(ref64.shape)}")
    ref64 = ref64.detach().double().cpu()
    fast, ref_lp = fast.detach().cpu(), ref_lp.detach().cpu()
    finite = torch.isfinite(ref64)
    same_nonfinite = torch.equal(torch.isnan(fast), torch.isnan(ref64)) and torch.equal(
        torch.isinf(fast) & (fast > 0), torch.isinf(ref64) & (ref64 > 0)) and torch.equal(
        torch.isinf(fast) & (fast < 0), torch.isinf(ref64) & (ref64 < 0))
    if not same_nonfinite:
        bad = int((torch.isfinite(fast) != finite).sum())
        return Comparison(name, math.inf, math.nan, floor, False,
                          f"{bad} elements are finite in one and not in the other (NaN/inf mismatch)")
    err_fast = _max_abs_diff(fast, ref64, finite)
    err_ref = _max_abs_diff(ref_lp, ref64, finite & torch.isfinite(ref_lp))
    ulp = ulp_at(dtype, float(ref64[finite].abs().max())) if bool(finite.any()) else 0.0
    passed = err_fast <= max(2.0 * err_ref + floor, ulp)
    return Comparison(name, err_fast, err_ref, floor, passed, ulp=ulp)
