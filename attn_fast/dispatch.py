"""Which path runs an op: the Triton kernels or the PyTorch reference (DESIGN.md section 3).

* CUDA tensors run the Triton kernels.
* CPU tensors run the "CPU path": the fastest correct CPU implementation of the op (``CPU_PATHS``;
  for attention torch's fused CPU kernels, ops/attention_cpu.py), else the reference. With Triton's
  interpreter on (``TRITON_INTERPRET=1`` before triton is imported) they run the same kernels,
  interpreted, unless ``set_backend("cpu")`` asks for the CPU path.
* float64 always runs the reference; so does an op (or a configuration of one) that has no kernel yet.
* So does a call under forward-mode AD (``torch.autograd.forward_ad`` dual tensors) or a ``torch.func``
  transform (grad, vmap, jvp, jacrev, jacfwd, ...): the kernels' custom ops have reverse-mode autograd
  only, and the reference is plain torch, which every transform supports (``autograd_unsupported``).
* ``set_backend("reference")`` or ``ATTN_FAST_BACKEND=reference`` forces the reference everywhere;
  ``"triton"`` demands the kernels and raises where they cannot run; ``"cpu"`` sends CPU tensors to
  the CPU path even under the interpreter (CUDA tensors still run the kernels); ``"auto"`` is the
  default.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Dict, Iterable, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _forward_ad

__all__ = ["BACKENDS", "OPS", "set_backend", "get_backend", "interpreter_enabled", "autograd_unsupported", "Route",
           "route"]

BACKENDS = ("auto", "triton", "cpu", "reference")
ENV_VAR = "ATTN_FAST_BACKEND"

#: Every public op, and whether a Triton kernel is wired behind it. A kernel issue flips its entry when
#: the op's Triton path is reachable from the public API.
OPS: Dict[str, bool] = {
    "scaled_dot_product_attention": True,
    "squeeze_excite": True,
    "efficient_channel_attention": True,
    "cbam": True,
}

#: The ops whose CPU path is an implementation of its own (not the reference).
CPU_PATHS: Dict[str, bool] = {
    "scaled_dot_product_attention": True,
    "squeeze_excite": True,
    "efficient_channel_attention": False,
    "cbam": False,
}

_lock = threading.Lock()
_backend_override: Optional[str] = None
_warned: set = set()


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a path for every op: "auto" (default), "triton", "cpu" or "reference".
    ``None`` clears the override, so ``ATTN_FAST_BACKEND`` (or "auto") applies again."""
    global _backend_override
    _backend_override = None if name is None else _check_backend(name, "backend")


def get_backend() -> str:
    """The backend in force: ``set_backend``'s choice, else ``ATTN_FAST_BACKEND``, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return "auto"
    name = _parsed_backend.get(raw)
    if name is None:  # read on every call (the variable may change), parsed once per value
        env = raw.strip().lower()
        name = _parsed_backend[raw] = _check_backend(env, ENV_VAR) if env else "auto"
    return name


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter runs kernels (read the way triton reads it)."""
    raw = os.environ.get("TRITON_INTERPRET")
    return raw is not None and raw.strip().lower() in _TRUE


_TRUE = frozenset(("1", "true", "yes", "on", "y"))
_parsed_backend: Dict[str, str] = {}


#: The reasons ``autograd_unsupported`` gives (the warning names them once per op).
FUNC_TRANSFORMS = "torch.func transforms (grad, vmap, jvp, jacrev, jacfwd, ...)"
FORWARD_AD = "forward-mode AD (torch.autograd.forward_ad dual tensors)"


def _has_tangent(t: Optional[torch.Tensor]) -> bool:
    return isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None


def autograd_unsupported(tensors: Iterable[Optional[torch.Tensor]] = ()) -> Optional[str]:
    """Why the kernels' custom ops cannot differentiate a call on ``tensors`` under the autograd
    mode in force (None when they can). Their autograd is reverse mode only
    (``register_autograd``): under forward-mode AD they would drop tangents (None or zeros), under a
    ``torch.func`` transform torch refuses them; such a call runs the reference instead.

    * any active ``torch.func`` transform (grad, vmap, jvp, jacrev, jacfwd, hessian,
      functional_call under one of them): one TLS read, whatever the tensors;
    * inside ``torch.autograd.forward_ad.dual_level()``, any of ``tensors`` that carries a tangent
      (looked at only inside a dual level, so the ordinary call pays nothing).

    Both checks stay on under torch.compile (skipping them there would drop tangents silently):
    dynamo evaluates the transform check inside a compiled ``torch.func`` transform (the graph then
    holds the reference), and it does not take dual tensors as graph inputs (it runs such a frame
    eagerly, where the check sees them). A call traced inside a dual level takes the reference even
    without tangents, since dynamo keeps no guard on tangents: a graph traced for plain tensors
    could be reused for dual ones. An ordinary compiled call traces two constants (no transform, no
    dual level) and keeps the kernels, without a graph break."""
    if torch._C._are_functorch_transforms_active():
        return FUNC_TRANSFORMS
    if _forward_ad._current_level >= 0:
        if torch.compiler.is_compiling() or any(_has_tangent(t) for t in tensors):
            return FORWARD_AD
    return None


class Route(NamedTuple):
    """The chosen path ("triton", "cpu" or "reference") and why (a tuple: cheap to make per call)."""

    path: str
    reason: str


_FORCED_REFERENCE = Route("reference", "backend forced to 'reference'")
_FLOAT64 = Route("reference", "float64 runs the reference")
_CPU_PATH = Route("cpu", "CPU tensor: the CPU path")
_CPU_REFERENCE = {op: Route("reference", f"cpu tensor: the CPU path of {op} is the reference") for op in OPS}


def warn_once(key: str, message: str) -> None:
    """Warn with ``message`` the first time ``key`` is seen in this process (not while torch.compile
    traces: dynamo cannot enter the lock, and the eager call warns)."""
    if torch.compiler.is_compiling():
        return
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def route(op: str, device: torch.device, dtype: torch.dtype, unsupported: Optional[str] = None,
          *, warn: bool = True, tensors: Iterable[Optional[torch.Tensor]] = ()) -> Route:
    """Decide the path for ``op`` on tensors of ``device``/``dtype``.

    ``unsupported`` names a configuration the op's kernel does not cover (None if covered); such a
    call falls back to the reference with a one-time warning (unless ``warn=False``) when it would
    otherwise run a kernel. ``tensors`` are every tensor the call differentiates through (inputs and
    parameters, None allowed): one under forward-mode AD, or any call under a ``torch.func``
    transform, is unsupported as well (``autograd_unsupported``).
    """
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; known: {sorted(OPS)}")
    backend = get_backend()
    if backend == "reference":
        return _FORCED_REFERENCE
    if dtype == torch.float64:
        return _FLOAT64
    kind = device.type
    if kind == "cuda":
        where = "CUDA tensor"
    elif kind == "cpu" and interpreter_enabled() and backend != "cpu":
        where = "CPU tensor under the Triton interpreter"
    elif backend == "triton":
        raise RuntimeError(
            f"{op}: backend 'triton' cannot run {kind} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before triton is imported to interpret the kernels on the CPU")
    else:
        if not CPU_PATHS[op]:
            if kind == "cpu":
                return _CPU_REFERENCE[op]
            return Route("reference", f"{kind} tensor: the CPU path of {op} is the reference")
        transform = autograd_unsupported(tensors)  # torch's fused CPU kernels have no forward-mode AD
        if transform is not None:
            return Route("reference", f"{kind} tensor under {transform}: the reference")
        return _CPU_PATH if kind == "cpu" else Route("cpu", f"{kind} tensor: the CPU path")
    if unsupported is None:
        unsupported = autograd_unsupported(tensors)
    if not OPS[op]:
        reason = f"no Triton kernel for {op} yet"
    elif unsupported is not None:
        reason = f"the {op} kernel does not cover {unsupported}"
    else:
        return Route("triton", where)
    if warn:
        warn_once(f"{op}:{reason}", f"attn_fast: {reason}; running the PyTorch reference instead")
    return Route("reference", reason)
