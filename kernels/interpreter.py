"""What the kernels do differently under Triton's interpreter (TRITON_INTERPRET=1), where the test
suite runs them on the CPU. Two gaps of the interpreter (triton 3.8) need a kernel-side switch, set
by the launchers only when interpreting (DESIGN.md section 2):

* a ``tl.dot`` of two bfloat16 operands multiplies raw bit patterns: kernels take ``DOT_F32`` and
  cast the operands to fp32 first;
* a fp32 -> bfloat16 cast truncates (rounds toward zero) where a GPU rounds to nearest even: kernels
  that store bfloat16 take ``BF16_RNE`` and round with :func:`bf16_rne` before the cast, so the
  interpreted results have the GPU's rounding (one rounding of 2**-9 relative, not up to 2**-8).

The interpreter is also not thread-safe (it patches ``triton.language`` while a kernel runs), so
the ops run their launches inside :func:`kernel_section`, which lets one thread at a time in when
interpreting and costs nothing on a GPU.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl

__all__ = ["interpreting", "bf16_rne", "needs_bf16_rne", "kernel_section"]

_INTERPRETER_LOCK = threading.RLock()


def interpreting() -> bool:
    """Triton's interpreter is on (read as triton reads TRITON_INTERPRET)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def kernel_section():
    """Context for code that launches kernels: under the interpreter, a process-wide re-entrant lock
    (interpreted launches from several threads would corrupt each other); else nothing."""
    return _INTERPRETER_LOCK if interpreting() else contextlib.nullcontext()


def needs_bf16_rne(dtype: torch.dtype) -> bool:
    """Whether a kernel storing ``dtype`` must round bf16 itself (the interpreter's cast truncates)."""
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def bf16_rne(x):
    """fp32 ``x`` rounded to the nearest bfloat16 value (ties to even), returned as fp32, so that a
    following truncating cast is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
