"""The benchmark runner's correctness table on a CPU-only machine (DESIGN.md sections 5 and 6): every
Triton kernel verified under Triton's interpreter on small shapes.

For each check case (an op and a variant of it, see :data:`CHECKS`) and dtype, the public
``attn_fast`` function runs on CPU tensors, which with ``TRITON_INTERPRET=1`` takes the Triton path
(asserted through ``attn_fast.dispatch.route``), forward and backward under a random upstream
gradient. Its output and every input gradient are judged against the reference in the dtype and in
float64 (on the same dtype-rounded inputs, upcast) by the numerics rule (``attn_fast.numerics.compare``); buffers the op updates in place
(BatchNorm running statistics) are judged the same way. Output buffers start as NaN, so an element a
kernel never writes fails. Each kernel launch is counted (by wrapping the ``run`` method of every
kernel object that ``attn_fast.kernels.aot.collect_cases()`` lists), so the table also says which
kernels no case reached.

Use::

    python -m bench.interpreter_check [--json] [--quick] [--dtypes fp32 fp16 bf16]

or, from a process whose triton runs compiled kernels (the interpreter must be on before triton is
imported), :func:`run_in_subprocess`. In-process: :func:`run_checks` and :func:`format_table`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["CheckCase", "CHECKS", "DTYPES", "run_checks", "format_table", "run_in_subprocess", "main"]

#: dtype names accepted by ``--dtypes`` / ``dtypes``.
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: ``progress(done, total, row)`` after each row.
Progress = Callable[[int, int, Dict[str, Any]], None]

Inputs = Dict[str, Any]


# ---------------------------------------------------------------------------------------------------
# Check cases
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckCase:
    """One op and variant on small inputs.

    ``make(gen)`` returns the keyword arguments of the public function: floating tensors in float64
    (drawn with ``gen``; cast to each checked dtype, memory format kept; the float64 reference runs on
    the cast values upcast again), bool tensors, and plain
    options. Every floating tensor gets a gradient except those named in ``state``: buffers the op
    updates in place, compared after the run instead. ``dropout_seed``: the op draws a dropout mask
    (attention with ``dropout_p > 0``); the fast run starts from ``torch.manual_seed(dropout_seed)``
    and the reference applies the keep-mask the kernels drew, regenerated from the same seed.
    ``quick``: the op's case kept by ``quick=True``.
    """

    op: str
    name: str
    make: Callable[[torch.Generator], Inputs]
    state: Tuple[str, ...] = ()
    dropout_seed: Optional[int] = None
    quick: bool = False


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    """Random normal float64 values (never zeros)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _attention(b: int, hq: int, lq: int, lk: int, e: int, ev: Optional[int] = None, hk: Optional[int] = None,
               **options: Any) -> Callable[[torch.Generator], Inputs]:
    def make(gen: torch.Generator) -> Inputs:
        inputs: Inputs = dict(query=_randn(gen, b, hq, lq, e), key=_randn(gen, b, hk or hq, lk, e),
                              value=_randn(gen, b, hk or hq, lk, ev or e))
        return {**inputs, **options}
    return make


def _attention_masked(kind: str, b: int, h: int, lq: int, lk: int, e: int,
                      mask_shape: Tuple[int, ...]) -> Callable[[torch.Generator], Inputs]:
    base = _attention(b, h, lq, lk, e)

    def make(gen: torch.Generator) -> Inputs:
        inputs = base(gen)
        if kind == "bool":
            mask = torch.rand(*mask_shape, generator=gen, dtype=torch.float64) > 0.4
            mask[..., 0] = True  # no fully masked row (those are covered by tests/test_attention.py)
        else:
            mask = _randn(gen, *mask_shape)
            mask[..., 3] = float("-inf")
        return {**inputs, "attn_mask": mask}
    return make


def _image(gen: torch.Generator, n: int, c: int, h: int, w: int, channels_last: bool) -> Tensor:
    x = _randn(gen, n, c, h, w)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _se(n: int, c: int, h: int, w: int, cr: int, *, single: bool = False, channels_last: bool = False,
        **options: Any) -> Callable[[torch.Generator], Inputs]:
    def make(gen: torch.Generator) -> Inputs:
        x = _image(gen, n, c, h, w, channels_last)
        if single:  # timm EffectiveSE: one (C, C) fc
            return dict(x=x, fc1_weight=_randn(gen, c, c, scale=0.3), fc1_bias=_randn(gen, c), **options)
        return dict(x=x, fc1_weight=_randn(gen, cr, c, scale=0.3), fc1_bias=_randn(gen, cr),
                    fc2_weight=_randn(gen, c, cr, scale=0.3), fc2_bias=_randn(gen, c), **options)
    return make


def _eca(n: int, c: int, h: int, w: int, k: int, *, channels_last: bool = False,
         **options: Any) -> Callable[[torch.Generator], Inputs]:
    def make(gen: torch.Generator) -> Inputs:
        return dict(x=_image(gen, n, c, h, w, channels_last), conv_weight=_randn(gen, 1, 1, k), **options)
    return make


def _cbam(n: int, c: int, h: int, w: int, cr: int, *, k: int = 7, light: bool = False, biases: bool = False,
          channels_last: bool = False, **options: Any) -> Callable[[torch.Generator], Inputs]:
    """CBAM with a BatchNorm on the spatial conv (as timm's ConvNormAct), running statistics included."""
    def make(gen: torch.Generator) -> Inputs:
        inputs: Inputs = dict(x=_image(gen, n, c, h, w, channels_last), fc1_weight=_randn(gen, cr, c, scale=0.3),
                              fc2_weight=_randn(gen, c, cr, scale=0.3),
                              conv_weight=_randn(gen, 1, 1 if light else 2, k, k, scale=0.3))
        if biases:
            inputs.update(fc1_bias=_randn(gen, cr), fc2_bias=_randn(gen, c), conv_bias=_randn(gen, 1))
        inputs.update(bn_weight=_randn(gen, 1), bn_bias=_randn(gen, 1), bn_running_mean=_randn(gen, 1),
                      bn_running_var=torch.rand(1, generator=gen, dtype=torch.float64) + 0.5, light=light)
        return {**inputs, **options}
    return make


_BN_STATE = ("bn_running_mean", "bn_running_var")

#: The table's cases: every op, and the variants that reach every launchable kernel. Shapes are tiny
#: (the interpreter runs each program of a grid in numpy) but not multiples of the block sizes, and
#: attention lengths cross the interpreter's 32 x 32 tiles.
CHECKS: List[CheckCase] = [
    CheckCase("scaled_dot_product_attention", "plain B2 H1 L40 E16", _attention(2, 1, 40, 40, 16)),
    CheckCase("scaled_dot_product_attention", "causal B1 H2 L40 E16", _attention(1, 2, 40, 40, 16, is_causal=True)),
    CheckCase("scaled_dot_product_attention", "bool mask (Lq, Lk) Lq23 Lk19",
              _attention_masked("bool", 1, 2, 23, 19, 16, (23, 19))),
    CheckCase("scaled_dot_product_attention", "float mask (B, 1, 1, Lk) -inf col",
              _attention_masked("float", 2, 2, 23, 19, 16, (2, 1, 1, 19))),
    CheckCase("scaled_dot_product_attention", "GQA Hq4 Hk2 causal",
              _attention(1, 4, 21, 18, 16, hk=2, enable_gqa=True, is_causal=True)),
    CheckCase("scaled_dot_product_attention", "cross Lq17 Lk45", _attention(1, 2, 17, 45, 16)),
    CheckCase("scaled_dot_product_attention", "head size E24 (not 2^n)", _attention(1, 2, 19, 23, 24)),
    CheckCase("scaled_dot_product_attention", "Ev40 != E16", _attention(1, 2, 19, 23, 16, ev=40)),
    CheckCase("scaled_dot_product_attention", "dropout 0.25 causal",
              _attention(1, 2, 37, 29, 16, dropout_p=0.25, is_causal=True), dropout_seed=1234, quick=True),
    CheckCase("squeeze_excite", "avg relu/sigmoid", _se(2, 24, 5, 7, 6), quick=True),
    CheckCase("squeeze_excite", "avgmax silu", _se(2, 24, 5, 7, 6, pool="avgmax", activation="silu")),
    CheckCase("squeeze_excite", "effective (single fc) hardsigmoid",
              _se(2, 20, 4, 4, 0, single=True, gate="hardsigmoid")),
    CheckCase("squeeze_excite", "channels_last avgmax hardswish",
              _se(2, 24, 5, 7, 6, channels_last=True, pool="avgmax", activation="hardswish")),
    CheckCase("efficient_channel_attention", "k3 sigmoid", _eca(2, 37, 5, 3, 3), quick=True),
    CheckCase("efficient_channel_attention", "k5 hardsigmoid channels_last",
              _eca(2, 37, 5, 3, 5, channels_last=True, gate="hardsigmoid")),
    CheckCase("cbam", "timm default (k7, BN eval)", _cbam(2, 24, 5, 7, 6), state=_BN_STATE, quick=True),
    CheckCase("cbam", "BN training k3", _cbam(3, 16, 4, 5, 4, k=3, bn_training=True), state=_BN_STATE),
    CheckCase("cbam", "light (k7, BN eval)", _cbam(2, 24, 5, 7, 6, light=True), state=_BN_STATE),
    CheckCase("cbam", "channels_last biases max_mean",
              _cbam(2, 24, 5, 7, 6, k=3, biases=True, channels_last=True, spatial_order="max_mean"),
              state=_BN_STATE),
]


# ---------------------------------------------------------------------------------------------------
# Counting kernel launches
# ---------------------------------------------------------------------------------------------------

class _Probe(Exception):
    """Raised by a wrapped launch while probing, before anything runs."""


class LaunchCounter:
    """Within ``with``: counts the launches of each kernel object (name -> kernel).

    A launch ``kernel[grid](*args)`` goes through ``KernelInterface.__getitem__``, which (triton 3.x,
    jitted and interpreted alike) calls ``self.run(grid=..., warmup=False, ...)`` when the launch
    happens, so an instance attribute ``run`` wrapping the class's sees every launch. On entry each
    kernel is probed with a launch whose wrapper raises before running anything; a triton whose
    ``__getitem__`` does not reach ``self.run`` gets the object's class swapped for a subclass whose
    ``__getitem__`` counts instead. Everything is restored on exit.
    """

    def __init__(self, kernels: Dict[str, Any]) -> None:
        self.kernels = kernels
        self.total: Dict[str, int] = {name: 0 for name in kernels}
        self.current: Dict[str, int] = {}
        self._probing = False
        self._undo: List[Callable[[], None]] = []

    def _hit(self, name: str) -> None:
        if self._probing:
            raise _Probe(name)
        self.total[name] += 1
        self.current[name] = self.current.get(name, 0) + 1

    def _probe(self, kernel: Any) -> bool:
        self._probing = True
        try:
            kernel[(1,)]()
        except _Probe:
            return True
        except Exception:  # the launch went elsewhere (and failed for lack of arguments)
            return False
        finally:
            self._probing = False
        return False

    def _wrap_run(self, name: str, kernel: Any) -> None:
        had_own = "run" in vars(kernel)
        own = vars(kernel).get("run")
        original = kernel.run

        def run(*args: Any, **kwargs: Any) -> Any:
            self._hit(name)
            return original(*args, **kwargs)

        kernel.run = run

        def undo() -> None:
            if had_own:
                kernel.run = own
            else:
                vars(kernel).pop("run", None)
        self._undo.append(undo)

    def _swap_class(self, name: str, kernel: Any) -> None:
        cls = type(kernel)
        counter = self

        class Counted(cls):  # type: ignore[misc, valid-type]
            def __getitem__(self, grid: Any) -> Any:
                launch = super().__getitem__(grid)

                def counted(*args: Any, **kwargs: Any) -> Any:
                    counter._hit(name)
                    return launch(*args, **kwargs)
                return counted

        Counted.__name__ = Counted.__qualname__ = f"Counted{cls.__name__}"
        kernel.__class__ = Counted

        def undo() -> None:
            kernel.__class__ = cls
        self._undo.append(undo)

    def __enter__(self) -> "LaunchCounter":
        try:
            for name, kernel in self.kernels.items():
                self._wrap_run(name, kernel)
                if self._probe(kernel):
                    continue
                self._undo.pop()()
                self._swap_class(name, kernel)
                if not self._probe(kernel):
                    raise RuntimeError(f"cannot count launches of kernel {name} ({type(kernel).__name__}) with "
                                       f"this triton: neither its run method nor __getitem__ sees a launch")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._undo:
            self._undo.pop()()

    @contextlib.contextmanager
    def row(self) -> Iterator[Dict[str, int]]:
        """Counts of this row's launches (the dict fills as kernels launch)."""
        self.current = {}
        try:
            yield self.current
        finally:
            self.current = {}


def _kernel_objects() -> Dict[str, Any]:
    """Every launchable kernel (the distinct ``.fn`` of the AOT cases), by name."""
    from attn_fast.kernels.aot import collect_cases

    by_id: Dict[int, Any] = {}
    for case in collect_cases():
        by_id.setdefault(id(case.fn), case.fn)
    kernels: Dict[str, Any] = {}
    for fn in by_id.values():
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", repr(fn))
        if name in kernels:  # two modules with a kernel of the same name: qualify both
            module = getattr(getattr(fn, "fn", fn), "__module__", "?")
            name = f"{module.rsplit('.', 1)[-1]}.{name}"
        kernels[name] = fn
    return dict(sorted(kernels.items()))


def _check_interpreted(kernels: Dict[str, Any]) -> None:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a triton that moved it: trust the environment variable
        return
    compiled = [name for name, fn in kernels.items() if not isinstance(fn, InterpretedFunction)]
    if compiled:
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set but the kernels were defined without the interpreter "
            f"({', '.join(compiled)}): the variable must be set before triton is imported. "
            "Run `python -m bench.interpreter_check` or use bench.interpreter_check.run_in_subprocess.")


# ---------------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _poisoned_allocations() -> Iterator[None]:
    """``torch.empty``/``torch.empty_like`` start as NaN (so an element no kernel writes fails)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t: Tensor) -> Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: fill(real_empty_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like  # type: ignore[assignment]


def _cast(inputs: Inputs, dtype: torch.dtype, grads: Sequence[str]) -> Inputs:
    """Fresh copies of ``inputs``: floating tensors in ``dtype`` (memory format kept), the ones in
    ``grads`` requiring grad."""
    out: Inputs = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor):
            value = value.detach()
            value = value.to(dtype) if value.is_floating_point() else value
            value = value.clone().requires_grad_(key in grads)
        out[key] = value
    return out


def _functions(op: str) -> Tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    import attn_fast
    from attn_fast import reference

    return getattr(attn_fast, op), getattr(reference, op)


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def _seed_of(case: CheckCase) -> int:
    return zlib.crc32(f"{case.op}/{case.name}".encode())


def _check_row(case: CheckCase, dtype: torch.dtype) -> Dict[str, Any]:
    """Run one case in one dtype; returns the comparison fields of its row (raises on a crash)."""
    from attn_fast import dispatch
    from attn_fast.numerics import Comparison, compare

    gen = torch.Generator().manual_seed(_seed_of(case))
    inputs64 = case.make(gen)
    grads = [k for k, v in inputs64.items()
             if isinstance(v, Tensor) and v.is_floating_point() and k not in case.state]
    fast_fn, ref_fn = _functions(case.op)
    failures: List[str] = []

    route = dispatch.route(case.op, torch.device("cpu"), dtype, warn=False)
    if route.path != "triton":
        failures.append(f"route says {route.path!r} ({route.reason}), not 'triton'")

    keep_mask: Optional[Tensor] = None
    if case.dropout_seed is not None:
        from attn_fast.ops.attention import draw_dropout_seed, dropout_keep_mask

        q, k = inputs64["query"], inputs64["key"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(case.dropout_seed)
            keep_mask = dropout_keep_mask(draw_dropout_seed(), (q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
                                          inputs64["dropout_p"], torch.device("cpu"))

    inputs = _cast(inputs64, dtype, ())  # the checked inputs; the float64 reference runs on them upcast
    runs: Dict[str, Tuple[Inputs, Tensor]] = {}
    for label, run_dtype in (("fast", dtype), ("lp", dtype), ("64", torch.float64)):
        args = _cast(inputs, run_dtype, grads)
        if label == "fast":
            with contextlib.ExitStack() as stack:
                stack.enter_context(_poisoned_allocations())
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("error", RuntimeWarning)  # a silent fallback to the reference fails
                if case.dropout_seed is not None:
                    stack.enter_context(torch.random.fork_rng(devices=[]))
                    torch.manual_seed(case.dropout_seed)
                y = fast_fn(**args)
        else:
            y = ref_fn(**args, **({} if keep_mask is None else {"dropout_mask": keep_mask}))
        runs[label] = (args, y)

    y_fast, y64, y_lp = (runs[label][1] for label in ("fast", "64", "lp"))
    fwd = compare(y_fast, y64, y_lp, name="output", dtype=dtype)
    if not fwd.passed:
        failures.append(str(fwd))
    if _memory_format(y_fast) != _memory_format(runs["fast"][0].get("x", y_fast)):
        failures.append("output memory format differs from x's")

    g64 = torch.randn(y64.shape, generator=gen, dtype=torch.float64)
    for label, (args, y) in runs.items():
        g = torch.empty_like(y).copy_(g64)  # the upstream gradient in y's dtype and memory format
        if label == "fast":
            with _poisoned_allocations(), warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                y.backward(g)
        else:
            y.backward(g)

    checked: List[Comparison] = []
    for name in grads:
        fast, ref64, ref_lp = (runs[label][0][name].grad for label in ("fast", "64", "lp"))
        if fast is None or ref64 is None or ref_lp is None:
            failures.append(f"grad {name}: no gradient from the {'fast op' if fast is None else 'reference'}")
            continue
        checked.append(compare(fast, ref64, ref_lp, name=f"grad {name}", dtype=dtype))
    for name in case.state:
        fast, ref64, ref_lp = (runs[label][0][name] for label in ("fast", "64", "lp"))
        checked.append(compare(fast, ref64, ref_lp, name=name, dtype=dtype))
    failures.extend(str(c) for c in checked if not c.passed)

    grad_checks = [c for c in checked if c.name.startswith("grad ")]

    def ratio(c: Comparison) -> float:
        return c.err_fast / c.bound if c.bound > 0 else math.inf

    worst = max(grad_checks, key=ratio) if grad_checks else None
    return dict(
        path=route.path,
        fwd_err=_finite(fwd.err_fast), fwd_bound=_finite(fwd.bound),
        grad_worst=worst.name[len("grad "):] if worst else None,
        grad_worst_err=_finite(worst.err_fast) if worst else None,
        grad_worst_bound=_finite(worst.bound) if worst else None,
        checked=1 + len(checked),
        failures=failures,
    )


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------

def _selected(quick: bool) -> List[CheckCase]:
    if not quick:
        return list(CHECKS)
    chosen: Dict[str, CheckCase] = {}
    for case in CHECKS:  # the case marked quick, else the op's first
        if case.op not in chosen or (case.quick and not chosen[case.op].quick):
            chosen[case.op] = case
    return [c for c in CHECKS if chosen[c.op] is c]


def run_checks(dtypes: Sequence[str] = ("fp32", "fp16", "bf16"), quick: bool = False,
               progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Run the check table in this process (Triton's interpreter must be on).

    Returns ``{"rows": [...], "kernels_all": [...], "kernels_unreached": [...], "triton": version,
    "torch": version, "seconds": total}``. A row: op, case, dtype, path, fwd_err, fwd_bound,
    grad_worst (the input whose gradient has the largest err/bound ratio), grad_worst_err,
    grad_worst_bound, checked (tensors compared), ok, failures (what failed), error (the exception of
    a case that raised, else None), kernels (names launched) and seconds. Non-finite errors are None.
    ``quick`` keeps one case per op (chosen so that every kernel is still reached).
    """
    from attn_fast import dispatch

    if not dispatch.interpreter_enabled():
        raise RuntimeError(
            "bench.interpreter_check needs Triton's interpreter: set TRITON_INTERPRET=1 before triton is "
            "imported (`python -m bench.interpreter_check` does), or call run_in_subprocess()")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtypes {unknown}; expected some of {list(DTYPES)}")
    import triton

    kernels = _kernel_objects()
    _check_interpreted(kernels)
    cases = _selected(quick)
    total = len(cases) * len(dtypes)
    rows: List[Dict[str, Any]] = []
    start = time.perf_counter()
    with LaunchCounter(kernels) as counter:
        for case in cases:
            for dname in dtypes:
                row: Dict[str, Any] = dict(op=case.op, case=case.name, dtype=dname)
                t0 = time.perf_counter()
                with counter.row() as launched:
                    try:
                        row.update(_check_row(case, DTYPES[dname]))
                        row["error"] = None
                    except Exception as exc:  # recorded in the row; the table goes on
                        frame = traceback.extract_tb(exc.__traceback__)[-1]
                        row.update(path=None, fwd_err=None, fwd_bound=None, grad_worst=None, grad_worst_err=None,
                                   grad_worst_bound=None, checked=0, failures=[],
                                   error=f"{type(exc).__name__}: {str(exc).strip()[:800]} "
                                         f"(at {Path(frame.filename).name}:{frame.lineno})")
                    row["kernels"] = sorted(launched)
                if row["error"] is None and not row["kernels"]:
                    row["failures"].append("no Triton kernel launched")
                row["ok"] = row["error"] is None and not row["failures"]
                row["seconds"] = round(time.perf_counter() - t0, 3)
                rows.append(row)
                if progress is not None:
                    progress(len(rows), total, row)
    return dict(
        rows=rows,
        kernels_all=list(kernels),
        kernels_unreached=[name for name, n in counter.total.items() if n == 0],
        triton=triton.__version__,
        torch=torch.__version__,
        seconds=round(time.perf_counter() - start, 3),
    )


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_table(result: Dict[str, Any]) -> str:
    """The rows as a Markdown table, then a line on the kernels that no row launched."""
    lines = [
        f"Triton kernels under the interpreter (triton {result.get('triton', '?')}, torch {result.get('torch', '?')}):"
        " each output and input gradient against the float64 reference by the numerics rule.",
        "",
        "| op | case | dtype | ok | fwd err | fwd bound | worst grad | grad err | grad bound | kernels | s |",
        "|---|---|---|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        ok = "yes" if r["ok"] else "**FAIL**"
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {ok} | {_num(r['fwd_err'])} | {_num(r['fwd_bound'])} "
                     f"| {r['grad_worst'] or '-'} | {_num(r['grad_worst_err'])} | {_num(r['grad_worst_bound'])} "
                     f"| {', '.join(r['kernels']) or '-'} | {r['seconds']:.1f} |")
    failed = [r for r in result["rows"] if not r["ok"]]
    lines.append("")
    for r in failed:
        why = r["error"] or "; ".join(r["failures"])
        lines.append(f"- FAIL {r['op']} / {r['case']} / {r['dtype']}: {why}")
    n = len(result["kernels_all"])
    unreached = result["kernels_unreached"]
    if unreached:
        lines.append(f"Unreached kernels ({len(unreached)} of {n}): {', '.join(unreached)}")
    else:
        lines.append(f"All {n} Triton kernels were reached: {', '.join(result['kernels_all'])}.")
    passed = len(result["rows"]) - len(failed)
    seconds = result.get("seconds")
    lines.append(f"{passed} of {len(result['rows'])} rows pass" + (f" ({seconds:.0f} s)." if seconds else "."))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------

def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def run_in_subprocess(dtypes: Sequence[str] = ("fp32", "fp16", "bf16"), quick: bool = False,
                      timeout: float = 900, cwd: Optional[str] = None) -> Dict[str, Any]:
    """Run the table in a child process with ``TRITON_INTERPRET=1`` (``python -m bench.interpreter_check
    --json``); its progress lines are copied to this process's stderr as they come. Returns the parsed
    result (see :func:`run_checks`); raises RuntimeError if the child crashes or times out."""
    cmd = [sys.executable, "-m", "bench.interpreter_check", "--json", "--dtypes", *dtypes]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.Popen(cmd, cwd=str(cwd or _repo_root()), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    tail: List[str] = []
    out: List[str] = []

    def pump_stderr() -> None:  # live: this process's user sees the progress
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            del tail[:-40]
            sys.stderr.write(line)
            sys.stderr.flush()

    def collect_stdout() -> None:
        assert proc.stdout is not None
        out.append(proc.stdout.read())

    # one reader per pipe (communicate() would read stderr too, racing the live copy)
    readers = [threading.Thread(target=pump_stderr, daemon=True), threading.Thread(target=collect_stdout, daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(cmd)} ran past {timeout:.0f} s") from None
    finally:
        for reader in readers:
            reader.join(10)
    stdout = "".join(out)
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} without a JSON result; its stderr ended "
                           f"with:\n{''.join(tail)[-3000:]}") from None


def _print_progress(done: int, total: int, row: Dict[str, Any]) -> None:
    verdict = "ok  " if row["ok"] else "FAIL"
    detail = "" if row["ok"] else f"  <- {row['error'] or '; '.join(row['failures'])}"
    print(f"[{done:>3}/{total}] {verdict} {row['op']:<28} {row['case']:<36} {row['dtype']:<4} "
          f"{row['seconds']:6.1f} s{detail}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.interpreter_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--quick", action="store_true", help="one case per op")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args(argv)
    from attn_fast import dispatch

    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not dispatch.interpreter_enabled():
        print("bench.interpreter_check: triton was imported before TRITON_INTERPRET=1 could be set; run "
              "`python -m bench.interpreter_check` in a fresh process (or TRITON_INTERPRET=1 in the "
              "environment)", file=sys.stderr)
        return 2
    result = run_checks(args.dtypes, args.quick, progress=_print_progress)
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(format_table(result))
    failed = any(not r["ok"] for r in result["rows"]) or bool(result["kernels_unreached"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
