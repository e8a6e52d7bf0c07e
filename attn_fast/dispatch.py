"""Which path runs an op: the Triton kernels or the PyTorch reference (DESIGN.md section 3).

* CUDA tensors run the Triton kernels.
* CPU tensors run the reference (the "CPU path"), unless Triton's interpreter is on
  (``TRITON_INTERPRET=1`` before triton is imported): then they run the same kernels, interpreted.
* float64 always runs the reference; so does an op (or a configuration of one) that has no kernel yet.
* ``set_backend("reference")`` or ``ATTN_FAST_BACKEND=reference`` forces the reference everywhere;
  ``"triton"`` demands the kernels and raises where they cannot run; ``"auto"`` is the default.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import torch

__all__ = ["BACKENDS", "OPS", "set_backend", "get_backend", "interpreter_enabled", "Route", "route"]

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "ATTN_FAST_BACKEND"

#: Every public op, and whether a Triton kernel is wired behind it. A kernel issue flips its entry when
#: the op's Triton path is reachable from the public API.
OPS: Dict[str, bool] = {
    "scaled_dot_product_attention": True,
    "squeeze_excite": True,
    "efficient_channel_attention": True,
    "cbam": True,
}

_lock = threading.Lock()
_backend_override: Optional[str] = None
_warned: set = set()


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a path for every op: "auto" (default), "triton" or "reference".
    ``None`` clears the override, so ``ATTN_FAST_BACKEND`` (or "auto") applies again."""
    global _backend_override
    _backend_override = None if name is None else _check_backend(name, "backend")


def get_backend() -> str:
    """The backend in force: ``set_backend``'s choice, else ``ATTN_FAST_BACKEND``, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check_backend(env, ENV_VAR) if env else "auto"


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter runs kernels (read the way triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


@dataclass(frozen=True)
class Route:
    """The chosen path ("triton" or "reference") and why."""

    path: str
    reason: str


def warn_once(key: str, message: str) -> None:
    """Warn with ``message`` the first time ``key`` is seen in this process."""
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def route(op: str, device: torch.device, dtype: torch.dtype, unsupported: Optional[str] = None,
          *, warn: bool = True) -> Route:
    """Decide the path for ``op`` on tensors of ``device``/``dtype``.

    ``unsupported`` names a configuration the op's kernel does not cover (None if covered); such a
    call falls back to the reference with a one-time warning (unless ``warn=False``) when it would
    otherwise run a kernel.
    """
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; known: {sorted(OPS)}")
    backend = get_backend()
    if backend == "reference":
        return Route("reference", "backend forced to 'reference'")
    if dtype == torch.float64:
        return Route("reference", "float64 runs the reference")
    if device.type == "cuda":
        where = "CUDA tensor"
    elif device.type == "cpu" and interpreter_enabled():
        where = "CPU tensor under the Triton interpreter"
    elif backend == "triton":
        raise RuntimeError(
            f"{op}: backend 'triton' cannot run {device.type} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before triton is imported to interpret the kernels on the CPU")
    else:
        return Route("reference", f"{device.type} tensor: the CPU path runs the reference")
    if not OPS[op]:
        reason = f"no Triton kernel for {op} yet"
    elif unsupported is not None:
        reason = f"the {op} kernel does not cover {unsupported}"
    else:
        return Route("triton", where)
    if warn:
        warn_once(f"{op}:{reason}", f"attn_fast: {reason}; running the PyTorch reference instead")
    return Route("reference", reason)
