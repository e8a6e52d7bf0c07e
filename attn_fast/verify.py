"""``attn_fast.verify``: prove that a converted model computes what the original does.

Runs the original and the converted model on the same inputs, in the model's dtype, and the
original again in float64 (the ground truth), forward and backward (one shared random output
gradient), and judges by the numerics rule (``attn_fast.numerics``): for the whole model its outputs,
the input gradients and every parameter gradient, and per swapped layer its output and the
gradients of its own parameters. The converted model passes where its error against the float64
original is at most twice the error of the original in the same dtype, plus the floor.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .convert import _OURS
from .numerics import Comparison, compare

__all__ = ["verify", "VerifyReport", "Check", "randomize_zero_init"]


@dataclass(frozen=True)
class Check:
    """One compared tensor: where (``scope``: "model" or a layer name), what, the errors, the verdict."""

    scope: str
    what: str
    max_abs: float
    max_rel: float
    bound: float
    passed: bool
    detail: str = ""


@dataclass
class VerifyReport:
    checks: List[Check] = field(default_factory=list)
    layers: List[str] = field(default_factory=list)
    dtype: Optional[torch.dtype] = None

    @property
    def passed(self) -> bool:
        """Every judged check passed (checks reported as "not judged" count as passed)."""
        return all(c.passed for c in self.checks)

    def for_scope(self, scope: str) -> List[Check]:
        return [c for c in self.checks if c.scope == scope]

    def __str__(self) -> str:
        head = (f"attn_fast.verify ({self.dtype}, against the float64 original): "
                f"{'PASS' if self.passed else 'FAIL'}, {len(self.layers)} swapped layer(s), {len(self.checks)} checks")
        rows = [f"  {'scope':<28} {'tensor':<34} {'max abs err':>11} {'max rel err':>11} {'bound':>10}  verdict"]
        for c in self.checks:
            rows.append(f"  {c.scope[:28]:<28} {c.what[:34]:<34} {c.max_abs:11.3e} {c.max_rel:11.3e} {c.bound:10.3e}  "
                        f"{'ok' if c.passed else 'FAIL'}{' (' + c.detail + ')' if c.detail else ''}")
        return "\n".join([head] + rows)


def randomize_zero_init(model: nn.Module, seed: Optional[int] = None) -> nn.Module:
    """Give a freshly built model non-trivial values where its initialisation put constants, so a
    verification exercises every layer: BatchNorm weights uniform in [0.5, 1.5] (timm zeroes the
    last one of each residual block, which would feed the block's attention layer zeros), running
    statistics random, and every all-zero parameter N(0, 0.1). Other weights keep their random
    initialisation. In place; returns ``model``."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def fill(t: Tensor, fn) -> None:
        t.copy_(fn(torch.empty(t.shape, dtype=torch.float64)).to(t))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    fill(m.weight, lambda t: t.uniform_(0.5, 1.5, generator=gen))
                if m.running_var is not None:
                    fill(m.running_mean, lambda t: t.normal_(0.0, 0.1, generator=gen))
                    fill(m.running_var, lambda t: t.uniform_(0.5, 1.5, generator=gen))
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                fill(p, lambda t: t.normal_(0.0, 0.1, generator=gen))
    return model


def _tensors(out: Any) -> List[Tensor]:
    """The floating tensors of a model's output (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _cast_inputs(inputs: Sequence[Any], dtype: Optional[torch.dtype]) -> List[Any]:
    out = []
    for t in inputs:
        if isinstance(t, Tensor) and t.is_floating_point():
            t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
            t.requires_grad_(True)
        out.append(t)
    return out


def _relative(fast: Tensor, ref64: Tensor) -> float:
    ref64 = ref64.detach().double().cpu()
    finite = torch.isfinite(ref64)
    if not bool(finite.any()):
        return 0.0
    scale = float(ref64[finite].abs().max())
    diff = float((fast.detach().double().cpu() - ref64)[finite].abs().max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _check(scope: str, what: str, fast: Optional[Tensor], ref64: Optional[Tensor], lp: Optional[Tensor],
           dtype: torch.dtype) -> Check:
    if fast is None or ref64 is None or lp is None:
        missing = [n for n, t in (("converted", fast), ("float64 original", ref64), ("original", lp)) if t is None]
        return Check(scope, what, math.inf, math.inf, math.nan, False, f"no value from the {', '.join(missing)}")
    c: Comparison = compare(fast, ref64, lp, name=what, dtype=dtype)
    return Check(scope, what, c.err_fast, _relative(fast, ref64) if math.isfinite(c.err_fast) else math.inf,
                 c.bound, c.passed, c.detail)


def _capture(model: nn.Module, names: Sequence[str], store: Dict[str, Any]):
    """Hooks keeping, per named submodule, its call's inputs (args, kwargs; detached) and its output
    (the first floating tensor)."""
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        def pre(_m, args, kwargs, name=name):
            detach = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
            store.setdefault(name, {})["args"] = ([detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()})

        def post(_m, _inp, out, name=name):
            tensors = _tensors(out)
            if tensors:
                store.setdefault(name, {})["out"] = tensors[0].detach()
        handles.append(modules[name].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(modules[name].register_forward_hook(post))
    return handles


def _run(model: nn.Module, args: Sequence[Any], kwargs: Dict[str, Any], dtype: torch.dtype,
         grads_out: Optional[List[Tensor]], seed: int):
    """Forward (and backward with ``grads_out``, drawn on first use) on inputs cast to ``dtype``.
    Returns (inputs, outputs, parameter gradients, grads_out)."""
    inputs = _cast_inputs(args, dtype)
    kw = {k: (v.detach().to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v)
          for k, v in kwargs.items()}
    outputs = _tensors(model(*inputs, **kw))
    if outputs and any(o.requires_grad for o in outputs):
        if grads_out is None:
            gen = torch.Generator().manual_seed(seed)
            grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
        torch.autograd.backward([o for o in outputs],
                                [g.to(device=o.device, dtype=o.dtype) for g, o in zip(grads_out, outputs)])
    return inputs, outputs, {n: p.grad for n, p in model.named_parameters()}, grads_out


def _judge(report: VerifyReport, scope: str, runs: Dict[str, tuple], dtype: torch.dtype, grads: bool,
           judged: bool = True, prefix: str = "") -> None:
    """Checks of outputs and (with ``grads``) input and parameter gradients of three runs."""
    (fi, fo, fp, _), (li, lo, lp, _), (ri, ro, rp, _) = runs["fast"], runs["lp"], runs["64"]
    note = "" if judged else "not judged"

    def add(what, a, b, c):
        check = _check(scope, what, a, b, c, dtype)
        if not judged:
            check = Check(check.scope, check.what, check.max_abs, check.max_rel, check.bound, True,
                          f"{'ok' if check.passed else 'over the bound'}; {note}")
        report.checks.append(check)

    if not (len(fo) == len(lo) == len(ro)):
        report.checks.append(Check(scope, "outputs", math.inf, math.inf, math.nan, False,
                                   "the runs return different numbers of tensors"))
        return
    for i, (a, b, c) in enumerate(zip(fo, ro, lo)):
        report.checks.append(_check(scope, f"output {i}" if len(fo) > 1 or scope == "model" else "output", a, b, c,
                                    dtype))
    if not grads:
        return
    for i, (a, b, c) in enumerate(zip(fi, ri, li)):
        if isinstance(a, Tensor) and a.requires_grad:
            add(f"grad input {i}", a.grad, b.grad, c.grad)
    for pname, g in fp.items():
        if g is None and rp.get(pname) is None:
            continue  # frozen or unused in both
        add(f"grad {prefix}{pname}", g, rp.get(pname), lp.get(pname))


def verify(original: nn.Module, converted: nn.Module, example_inputs: Any, *, dtype: Optional[torch.dtype] = None,
           backward: bool = True, seed: int = 0, judge_model_grads: Optional[bool] = None) -> VerifyReport:
    """Compare ``converted`` (from ``attn_fast.convert``) with ``original`` by the numerics rule.

    Two kinds of checks, each against the float64 original with the same-dtype original as the yardstick:

    * per swapped layer, in isolation: the layer's inputs as the float64 original saw them (cast to
      ``dtype``) go through the attn_fast layer, the original layer in ``dtype`` and in float64;
      its output, input gradients and parameter gradients are judged by the rule. These are exact
      statements about each swap, whatever the depth of the model.
    * the whole model: its outputs (always judged) and, with ``backward``, its input and parameter
      gradients. In fp16/bf16 a deep model's gradients are dominated by the rounding of every layer
      (the original's own relative error there reaches 10% and more), so two equally good runs
      differ by noise and the 2x rule would judge noise: by default (``judge_model_grads=None``)
      whole-model gradients are judged in fp32 and fp64 only, and reported (verdict "not judged")
      in 16-bit.

    Args:
        original: the model before conversion (not changed: the runs use copies).
        converted: the converted model (it may share parameters with ``original``).
        example_inputs: a tensor or a tuple of positional inputs; floating tensors are cast to
            ``dtype`` (and to float64 for the ground truth).
        dtype: the low-precision dtype (default: that of the converted model's first floating parameter).
        backward: also compare gradients (one shared random output gradient, drawn from ``seed``).
        judge_model_grads: judge the whole-model gradients (see above).

    Both models run in their current mode (``.eval()`` first switches dropout off; a model in training
    mode must not use dropout for the runs to be comparable).

    Returns:
        A :class:`VerifyReport`; ``report.passed`` is the verdict, ``print(report)`` the table.
    """
    for name, model in (("original", original), ("converted", converted)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"verify: {name} must be an nn.Module, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"verify: dtype must be a floating torch.dtype (float16, bfloat16, float32, float64) or None, "
                        f"got {dtype!r}")
    if isinstance(example_inputs, Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if dtype is None:
        dtype = next((p.dtype for p in converted.parameters() if p.is_floating_point()), torch.float32)
    if judge_model_grads is None:
        judge_model_grads = dtype in (torch.float32, torch.float64)
    layers = [name for name, m in converted.named_modules() if isinstance(m, _OURS)]
    report = VerifyReport(layers=layers, dtype=dtype)
    models = {"fast": copy.deepcopy(converted).to(dtype), "lp": copy.deepcopy(original).to(dtype),
              "64": copy.deepcopy(original).to(torch.float64)}
    originals = dict(models["64"].named_modules())
    missing = [n for n in layers if n not in originals]
    if missing:
        raise ValueError(f"verify: the original has no layers named {missing}: is it the model before conversion?")
    runs: Dict[str, tuple] = {}
    grads_out = None
    captured: Dict[str, Any] = {}
    for label in ("64", "lp", "fast"):
        handles = _capture(models[label], layers, captured) if label == "64" else []
        try:
            with torch.set_grad_enabled(backward):
                runs[label] = _run(models[label], example_inputs, {}, torch.float64 if label == "64" else dtype,
                                   grads_out if backward else None, seed)
        finally:
            for h in handles:
                h.remove()
        grads_out = runs[label][3] if backward else None
    _judge(report, "model", runs, dtype, backward, judged=judge_model_grads)

    fast_modules = dict(models["fast"].named_modules())
    for name in layers:
        if "args" not in captured.get(name, {}):
            report.checks.append(Check(name, "output", math.inf, math.inf, math.nan, False, "the layer was not called"))
            continue
        args, kwargs = captured[name]["args"]
        layer_runs = {}
        layer_grads = None
        for label, source, run_dtype in (("64", originals[name], torch.float64),
                                         ("lp", originals[name], dtype), ("fast", fast_modules[name], dtype)):
            layer = copy.deepcopy(source).to(run_dtype)
            with torch.set_grad_enabled(backward):
                layer_runs[label] = _run(layer, args, kwargs, run_dtype, layer_grads if backward else None, seed + 1)
            layer_grads = layer_runs[label][3] if backward else None
        _judge(report, name, layer_runs, dtype, backward, prefix=f"{name}.")
    return report
