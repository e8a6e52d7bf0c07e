"""``attn_fast.verify``: prove that a converted model computes what the original does.

Runs the original and the converted model on the same inputs, in the model's dtype, and the
original again in float64 (the ground truth), forward and backward (one shared random output
gradient), and judges by the numerics rule (``attn_fast.numerics``): the converted model passes where
its error against the float64 original is at most twice the error of the original in the same dtype,
plus the floor.

What decides is each swapped layer in isolation (its output, input and parameter gradients and
buffers, on the inputs the float64 original gave it) and the whole model's outputs and buffers. The
whole model's gradients are reported, with the cause of any excess: in a deep model they carry every
layer's rounding, amplified where the model is ill-conditioned (BatchNorm over a few values per
channel in training mode, ReLU/max decisions a last-bit difference flips), so two equally good runs
differ there by more than the 2x rule allows. A whole-model output or buffer over the bound where the
original itself has lost half its digits (relative error >= sqrt(eps)) is likewise reported, not
judged.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._validate import InputError, InputTypeError
from .convert import _OURS
from .numerics import Comparison, compare

__all__ = ["verify", "VerifyReport", "Check", "randomize_zero_init"]


@dataclass(frozen=True)
class Check:
    """One compared tensor: where (``scope``: "model" or a layer name), what, the errors, the verdict.

    ``judged`` is False for a check that is reported but does not decide (whole-model gradients, and a
    whole-model output or buffer where the model is ill-conditioned); ``passed`` is then True and
    ``detail`` says why it was not judged (and the cause, where it is over the bound)."""

    scope: str
    what: str
    max_abs: float
    max_rel: float
    bound: float
    passed: bool
    detail: str = ""
    judged: bool = True

    @property
    def over(self) -> bool:
        """The error is over the bound (or not finite)."""
        return not (self.max_abs <= self.bound)


@dataclass
class VerifyReport:
    checks: List[Check] = field(default_factory=list)
    layers: List[str] = field(default_factory=list)
    dtype: Optional[torch.dtype] = None
    notes: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every judged check passed (checks reported as "not judged" count as passed)."""
        return all(c.passed for c in self.checks)

    def for_scope(self, scope: str) -> List[Check]:
        return [c for c in self.checks if c.scope == scope]

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if not self.layers:
            verdict += " (no swapped layer: nothing of attn_fast was compared)"
        head = (f"attn_fast.verify ({self.dtype}, against the float64 original): "
                f"{verdict}, {len(self.layers)} swapped layer(s), {len(self.checks)} checks")
        notes = [f"  note: {n}" for n in self.notes]
        rows = [f"  {'scope':<28} {'tensor':<34} {'max abs err':>11} {'max rel err':>11} {'bound':>10}  verdict"]
        for c in self.checks:
            word = "FAIL" if not c.passed else ("over" if c.over else "ok")
            rows.append(f"  {c.scope[:28]:<28} {c.what[:34]:<34} {c.max_abs:11.3e} {c.max_rel:11.3e} {c.bound:10.3e}  "
                        f"{word}{' (' + c.detail + ')' if c.detail else ''}")
        return "\n".join([head] + notes + rows)


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


def _scale(ref64: Tensor) -> float:
    ref64 = ref64.detach().double()
    finite = torch.isfinite(ref64)
    return float(ref64[finite].abs().max()) if bool(finite.any()) else 0.0


def _check(scope: str, what: str, fast: Optional[Tensor], ref64: Optional[Tensor], lp: Optional[Tensor],
           dtype: torch.dtype) -> Tuple[Check, float]:
    """The rule's check, and the same-dtype original's own relative error (its conditioning)."""
    if fast is None or ref64 is None or lp is None:
        missing = [n for n, t in (("converted", fast), ("float64 original", ref64), ("original", lp)) if t is None]
        detail = f"no value from the {', '.join(missing)}"
        return Check(scope, what, math.inf, math.inf, math.nan, False, detail), math.nan
    c: Comparison = compare(fast, ref64, lp, name=what, dtype=dtype)
    check = Check(scope, what, c.err_fast, _relative(fast, ref64) if math.isfinite(c.err_fast) else math.inf,
                  c.bound, c.passed, c.detail)
    if not math.isfinite(c.err_ref):
        return check, math.nan
    scale = _scale(ref64)
    rel_ref = c.err_ref / scale if scale > 0 else (0.0 if c.err_ref == 0 else math.inf)
    return check, rel_ref


def _exact_check(scope: str, what: str, fast: Tensor, ref64: Tensor) -> Check:
    """An integer buffer (num_batches_tracked, an index table): equal to the float64 original's."""
    if fast.shape != ref64.shape:
        return Check(scope, what, math.inf, math.inf, 0.0, False,
                     f"shape {tuple(fast.shape)} != the float64 original's {tuple(ref64.shape)}")
    diff = (fast.detach().cpu().double() - ref64.detach().cpu().double()).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref64.detach().cpu().double().abs().max()) if ref64.numel() else 0.0
    return Check(scope, what, err, err / scale if scale else (0.0 if err == 0 else math.inf), 0.0, err == 0,
                 "" if err == 0 else "differs from the float64 original's")


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


#: Activations whose derivative jumps (their decision: on which side of each kink an input lies).
_KINKS = ((nn.ReLU, lambda m: (0.0,)), (nn.LeakyReLU, lambda m: (0.0,)), (nn.PReLU, lambda m: (0.0,)),
          (nn.Hardtanh, lambda m: (m.min_val, m.max_val)), (nn.Hardsigmoid, lambda m: (-3.0, 3.0)),
          (nn.Hardswish, lambda m: (-3.0, 3.0)))
_MAX_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)

#: BatchNorm in training mode over at most this many values per channel is named as a cause.
_FEW_VALUES = 16


def _decision(m: nn.Module, x: Tensor) -> Optional[Tensor]:
    """Which branch ``m`` takes on ``x``: the side of each kink (ReLU-like), the argmax (max pooling)."""
    with torch.no_grad():
        for cls, kinks in _KINKS:
            if isinstance(m, cls):
                out = torch.zeros(x.shape, dtype=torch.int8, device=x.device)
                for k in kinks(m):
                    out += x > k
                return out
        if isinstance(m, _MAX_POOLS):
            probe = copy.copy(m)  # a shallow copy: same parameters, its own return_indices
            probe.return_indices = True
            return probe.forward(x)[1]
    return None


class _Probe:
    """Forward pre-hooks on the three whole-model runs: the BatchNorm layers that normalise in training
    mode over few values per channel (float64 run), and the ReLU/max decisions of the same-dtype
    original and of the converted model that differ from the float64 original's."""

    def __init__(self) -> None:
        self.few: Dict[str, int] = {}
        self.decisions: Dict[Tuple[str, int], Tensor] = {}
        self.flips: Dict[str, List[Any]] = {"lp": [0, None], "fast": [0, None]}

    def attach(self, model: nn.Module, label: str) -> list:
        handles = []
        for name, m in model.named_modules():
            batchnorm = isinstance(m, nn.modules.batchnorm._BatchNorm)
            decides = isinstance(m, _MAX_POOLS) or any(isinstance(m, cls) for cls, _ in _KINKS)
            if not (batchnorm or decides):
                continue
            calls = [0]

            def pre(mod, args, name=name, calls=calls, batchnorm=batchnorm):
                x = args[0] if args and isinstance(args[0], Tensor) else None
                if x is None or not x.is_floating_point():
                    return
                if batchnorm:
                    if label == "64" and x.dim() >= 2 and x.shape[1] and (
                            mod.training or (mod.running_mean is None and mod.running_var is None)):
                        count = x.numel() // x.shape[1]
                        if count <= _FEW_VALUES:
                            self.few[name] = min(count, self.few.get(name, count))
                    return
                key = (name, calls[0])
                calls[0] += 1
                d = _decision(mod, x)
                if d is None:
                    return
                if label == "64":
                    self.decisions[key] = d
                    return
                ref = self.decisions.get(key)
                if ref is not None and ref.shape == d.shape:
                    n = int((ref != d).sum())
                    if n:
                        tally = self.flips[label]
                        tally[0] += n
                        tally[1] = tally[1] or name
            handles.append(m.register_forward_pre_hook(pre))
        return handles


class _Judge:
    """Turns the rule's checks into verdicts: per-layer checks and whole-model outputs and buffers are
    judged (a whole-model one over the bound where the original has lost half its digits is reported);
    whole-model gradients are reported (or, with ``judge_grads``, judged like outputs)."""

    def __init__(self, report: VerifyReport, dtype: torch.dtype, probe: _Probe, judge_grads: bool) -> None:
        self.report, self.dtype, self.probe, self.judge_grads = report, dtype, probe, judge_grads
        self.threshold = math.sqrt(torch.finfo(dtype).eps)
        self.name = str(dtype).replace("torch.", "")
        self.exempt = 0  # whole-model checks over the bound, reported
        self.whole: List[Check] = []

    def cause(self, rel_ref: float, grad: bool) -> str:
        parts = []
        if rel_ref >= self.threshold:
            parts.append(f"ill-conditioned: the {self.name} original's own relative error here is {rel_ref:.1e}, "
                         f">= sqrt(eps) = {self.threshold:.1e}")
        flips, where = self.probe.flips["fast"]
        if grad and flips:
            parts.append(f"{flips} ReLU/max decision(s) of the converted model differ from the float64 original's "
                         f"(first in {where}): its gradients took other branches")
        if not parts:
            parts.append(f"amplified: the model magnifies the swapped layers' rounding (each within the rule in "
                         f"its own checks); the {self.name} original's own relative error here is {rel_ref:.1e}")
        return "; ".join(parts)

    def add(self, check: Check, rel_ref: float, kind: str, whole: bool) -> None:
        """``kind``: "output", "grad" or "buffer"; ``whole``: a whole-model check (else a layer's)."""
        if whole:
            self.whole.append(check)
        if whole and math.isfinite(check.max_abs):
            reported = kind == "grad" and not self.judge_grads
            ill = not check.passed and rel_ref >= self.threshold
            if reported or ill:
                if check.over:
                    self.exempt += 1
                detail = "not judged" + (f": {self.cause(rel_ref, kind == 'grad')}" if check.over else "")
                check = replace(check, passed=True, judged=False, detail=detail)
                self.whole[-1] = check
        self.report.checks.append(check)

    def runs(self, scope: str, runs: Dict[str, tuple], grads: bool, prefix: Optional[str]) -> None:
        """Outputs and (with ``grads``) input and parameter gradients of the three runs (``scope`` "model":
        the whole model's, else the layer's of that name)."""
        whole = prefix is None
        prefix = prefix or ""
        (fi, fo, fp, _), (li, lo, lp, _), (ri, ro, rp, _) = runs["fast"], runs["lp"], runs["64"]
        if not (len(fo) == len(lo) == len(ro)):
            self.report.checks.append(Check(scope, "outputs", math.inf, math.inf, math.nan, False,
                                            "the runs return different numbers of tensors"))
            return
        for i, (a, b, c) in enumerate(zip(fo, ro, lo)):
            what = f"output {i}" if len(fo) > 1 or whole else "output"
            self.add(*_check(scope, what, a, b, c, self.dtype), "output", whole)
        if not grads:
            return
        for i, (a, b, c) in enumerate(zip(fi, ri, li)):
            if isinstance(a, Tensor) and a.requires_grad:
                self.add(*_check(scope, f"grad input {i}", a.grad, b.grad, c.grad, self.dtype), "grad", whole)
        for pname, g in fp.items():
            if g is None and rp.get(pname) is None:
                continue  # frozen or unused in both
            self.add(*_check(scope, f"grad {prefix}{pname}", g, rp.get(pname), lp.get(pname), self.dtype), "grad",
                     whole)

    def buffers(self, scope: str, models: Dict[str, nn.Module], prefix: Optional[str] = None) -> None:
        """The buffers after the runs (BatchNorm running statistics, num_batches_tracked, ...); ``prefix``
        None: the whole model's."""
        whole = prefix is None
        prefix = prefix or ""
        fast, ref64, lp = (dict(models[k].named_buffers()) for k in ("fast", "64", "lp"))
        for bname in list(ref64) + [n for n in fast if n not in ref64]:
            what = f"buffer {prefix}{bname}"
            a, b, c = fast.get(bname), ref64.get(bname), lp.get(bname)
            if a is None or b is None or c is None:
                self.add(Check(scope, what, math.inf, math.inf, math.nan, False,
                               "only in the " + ("original" if a is None else "converted model")), math.nan, "buffer",
                         whole)
            elif b.is_floating_point() and a.is_floating_point():
                self.add(*_check(scope, what, a, b, c, self.dtype), "buffer", whole)
            else:
                self.add(_exact_check(scope, what, a, b), math.nan, "buffer", whole)

    def notes(self) -> None:
        report = self.report
        model_grads = [c for c in self.whole if c.what.startswith("grad")]
        if not self.judge_grads and model_grads:
            over = sum(1 for c in model_grads if c.over)
            report.notes.append(f"whole-model gradients are reported, not judged ({over} of {len(model_grads)} over "
                                "the bound): the per-layer checks decide (judge_model_grads=True judges them)")
        if not self.exempt:
            return
        causes = []
        if self.probe.few:
            few = sorted(self.probe.few.items(), key=lambda kv: kv[1])
            names = ", ".join(f"{n} ({c} values per channel)" for n, c in few[:4])
            more = f" and {len(few) - 4} more" if len(few) > 4 else ""
            causes.append(f"BatchNorm in training mode over few values (its backward cancels): {names}{more}")
        (n_lp, at_lp), (n_fast, at_fast) = self.probe.flips["lp"], self.probe.flips["fast"]
        if n_lp or n_fast:
            causes.append(f"ReLU/max decisions that differ from the float64 original's: {n_lp} in the {self.name} "
                          f"original{f' (first in {at_lp})' if at_lp else ''}, {n_fast} in the converted model"
                          f"{f' (first in {at_fast})' if at_fast else ''}")
        report.notes.append(f"{self.exempt} whole-model check(s) over the bound, reported with their cause"
                            + (": " + "; ".join(causes) if causes else ""))


def verify(original: nn.Module, converted: nn.Module, example_inputs: Any, *, dtype: Optional[torch.dtype] = None,
           backward: bool = True, seed: int = 0, judge_model_grads: Optional[bool] = None) -> VerifyReport:
    """Compare ``converted`` (from ``attn_fast.convert``) with ``original`` by the numerics rule.

    Two kinds of checks, each against the float64 original with the same-dtype original as the yardstick:

    * per swapped layer, in isolation: the layer's inputs as the float64 original saw them (cast to
      ``dtype``) go through the attn_fast layer, the original layer in ``dtype`` and in float64 (each
      a fresh copy of the layer as passed in); its output, input gradients, parameter gradients and
      buffers are judged by the rule. These are exact statements about each swap, whatever the
      depth of the model, and they decide.
    * the whole model: its outputs and buffers (after the runs: a training-mode forward updates
      BatchNorm statistics) are judged; with ``backward``, its input and parameter gradients are
      reported. A deep model's gradients carry the rounding of every layer, amplified where the
      model is ill-conditioned (BatchNorm in training mode over a few values per channel, ReLU/max
      decisions flipped by last-bit differences, and in fp16/bf16 everywhere), so two equally good
      runs differ there by more than the 2x rule allows: a gradient over the bound is reported with
      its cause. A whole-model output or buffer over the bound where the same-dtype original's own
      relative error is at least sqrt(eps) (half its digits lost) is reported the same way.

    Args:
        original: the model before conversion (not changed: the runs use copies). It must not hold
            attn_fast layers, nor be ``converted`` itself (convert works in place: keep a
            ``copy.deepcopy`` of the model from before).
        converted: the converted model (it may share parameters with ``original``).
        example_inputs: a tensor or a tuple of positional inputs; floating tensors are cast to
            ``dtype`` (and to float64 for the ground truth).
        dtype: the low-precision dtype (default: that of the converted model's first floating parameter).
        backward: also compare gradients (one shared random output gradient, drawn from ``seed``).
        judge_model_grads: True judges the whole-model gradients too, as the outputs are (strict: a
            correct conversion of an ill-conditioned model can fail); the default reports them.

    Both models run in their current mode (``.eval()`` first switches dropout off; a model in training
    mode must not use dropout for the runs to be comparable).

    Returns:
        A :class:`VerifyReport`; ``report.passed`` is the verdict, ``print(report)`` the table (and
        notes naming the causes of whole-model checks over the bound).

    Raises:
        InputTypeError: ``original`` or ``converted`` is not an nn.Module, or ``dtype`` is not a
            floating dtype.
        InputError: ``original`` is ``converted``, holds attn_fast layers, or lacks a layer the
            converted model swapped.
    """
    for name, model in (("original", original), ("converted", converted)):
        if not isinstance(model, nn.Module):
            raise InputTypeError(f"verify: {name} must be an nn.Module, got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputTypeError(f"verify: dtype must be a floating torch.dtype (float16, bfloat16, float32, float64) "
                             f"or None, got {dtype!r}")
    if judge_model_grads is not None and not isinstance(judge_model_grads, bool):
        raise InputTypeError(f"verify: judge_model_grads must be a bool or None, got "
                             f"{type(judge_model_grads).__name__}")
    before = ("pass the model from before the conversion: original = copy.deepcopy(model), then "
              "converted = attn_fast.convert(model) (convert works in place)")
    if original is converted:
        raise InputError(f"verify: original is the converted model itself (the same object), so attn_fast would be "
                         f"compared with itself; {before}")
    ours = [name or "<model>" for name, m in original.named_modules() if isinstance(m, _OURS)]
    if ours:
        listed = ours[:3] + ([f"... {len(ours) - 3} more"] if len(ours) > 3 else [])
        raise InputError(f"verify: original holds attn_fast layer(s) {listed}: it is a converted model, so attn_fast "
                         f"would be compared with itself; {before}")
    if isinstance(example_inputs, Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if dtype is None:
        dtype = next((p.dtype for p in converted.parameters() if p.is_floating_point()), torch.float32)
    layers = [name for name, m in converted.named_modules() if isinstance(m, _OURS)]
    report = VerifyReport(layers=layers, dtype=dtype)
    pristine = dict(original.named_modules())  # the per-layer runs start from the layers as passed in
    pristine_fast = dict(converted.named_modules())
    missing = [n for n in layers if n not in pristine]
    if missing:
        raise InputError(f"verify: the original has no layers named {missing}: is it the model before conversion?")
    models = {"fast": copy.deepcopy(converted).to(dtype), "lp": copy.deepcopy(original).to(dtype),
              "64": copy.deepcopy(original).to(torch.float64)}
    runs: Dict[str, tuple] = {}
    grads_out = None
    captured: Dict[str, Any] = {}
    probe = _Probe()
    for label in ("64", "lp", "fast"):
        handles = _capture(models[label], layers, captured) if label == "64" else []
        handles += probe.attach(models[label], label)
        try:
            with torch.set_grad_enabled(backward):
                runs[label] = _run(models[label], example_inputs, {}, torch.float64 if label == "64" else dtype,
                                   grads_out if backward else None, seed)
        finally:
            for h in handles:
                h.remove()
        grads_out = runs[label][3] if backward else None
    judge = _Judge(report, dtype, probe, bool(judge_model_grads))
    judge.runs("model", runs, backward, prefix=None)
    judge.buffers("model", models)

    for name in layers:
        if "args" not in captured.get(name, {}):
            report.checks.append(Check(name, "output", math.inf, math.inf, math.nan, False, "the layer was not called"))
            continue
        args, kwargs = captured[name]["args"]
        layer_runs, layer_models = {}, {}
        layer_grads = None
        for label, source, run_dtype in (("64", pristine[name], torch.float64),
                                         ("lp", pristine[name], dtype), ("fast", pristine_fast[name], dtype)):
            layer = layer_models[label] = copy.deepcopy(source).to(run_dtype)
            with torch.set_grad_enabled(backward):
                layer_runs[label] = _run(layer, args, kwargs, run_dtype, layer_grads if backward else None, seed + 1)
            layer_grads = layer_runs[label][3] if backward else None
        judge.runs(name, layer_runs, backward, prefix=f"{name}." if name else "")
        judge.buffers(name, layer_models, prefix=f"{name}." if name else "")
    judge.notes()
    return report
