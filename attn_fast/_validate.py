"""Input checks shared by the public functions: each raises InputTypeError/InputError (a TypeError or
ValueError that is also a RuntimeError, as torch raises) naming the argument, what was expected and
what came."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


class InputError(ValueError, RuntimeError):
    """A bad argument value or shape. A ``ValueError`` that is also a ``RuntimeError``, the type torch's
    own ops raise for the same mistakes, so code written against torch catches it too."""


class InputTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype. A ``TypeError`` that is also a ``RuntimeError`` (what
    torch's ops raise for mixed dtypes and the like)."""


#: Floating dtypes the public ops accept: the kernels' three, and float64 (runs the reference).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def type_name(value) -> str:
    """The name of ``value``'s type for a message: ``float`` for builtins, ``numpy.bool`` (not a bare
    ``bool``) for another module's type."""
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module.split('.')[0]}.{cls.__qualname__}"


def _real(value) -> bool:
    """A real number that is not a bool: int, float, numpy's floating and integer scalars."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(fn: str, name: str, t, *, ndims: Sequence[int] = (), dtypes=FLOAT_DTYPES,
                 legend: str = "") -> Tensor:
    """``t`` is a Tensor with one of ``ndims`` (any if empty) and one of ``dtypes``."""
    if not isinstance(t, Tensor):
        raise InputTypeError(f"{fn}: {name} must be a torch.Tensor, got {type_name(t)}")
    if ndims and t.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise InputError(f"{fn}: {name} must be {want}{' ' + legend if legend else ''}, "
                         f"got shape {tuple(t.shape)}")
    if dtypes and t.dtype not in dtypes:
        raise InputTypeError(f"{fn}: {name} must have dtype {_dtype_names(dtypes)}, got {t.dtype}")
    return t


def check_same(fn: str, first: Tuple[str, Tensor], *others: Tuple[str, Optional[Tensor]],
               dtype: bool = True) -> None:
    """The named tensors share ``first``'s device (and dtype, unless ``dtype=False``)."""
    name0, t0 = first
    for name, t in others:
        if t is None:
            continue
        if t.device != t0.device:
            raise InputError(f"{fn}: {name} is on {t.device} but {name0} is on {t0.device}; "
                             "move them to the same device")
        if dtype and t.dtype != t0.dtype:
            raise InputTypeError(f"{fn}: {name} has dtype {t.dtype} but {name0} has {t0.dtype}; "
                            "they must match")


def check_shape(fn: str, name: str, t: Optional[Tensor], expected: Sequence[Tuple[int, ...]]) -> None:
    """``t`` (if given) has one of the ``expected`` shapes."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise InputTypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type_name(t)}")
    if tuple(t.shape) not in [tuple(e) for e in expected]:
        want = " or ".join(str(tuple(e)) for e in expected)
        raise InputError(f"{fn}: {name} must have shape {want}, got {tuple(t.shape)}")


def check_probability(fn: str, name: str, p) -> float:
    if not _real(p):
        raise InputTypeError(f"{fn}: {name} must be a float in [0, 1), got {type_name(p)}")
    if not (0.0 <= p < 1.0):  # also rejects NaN
        raise InputError(f"{fn}: {name} must be in [0, 1), got {p}")
    return float(p)


def check_scale(fn: str, scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, Tensor) and scale.numel() == 1 and scale.is_floating_point():
        scale = scale.item()  # torch takes a one-element tensor too
    if not _real(scale):
        raise InputTypeError(f"{fn}: scale must be a float or None, got {type_name(scale)}")
    if not math.isfinite(scale):
        raise InputError(f"{fn}: scale must be finite, got {scale}")
    return float(scale)


def check_choice(fn: str, name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InputError(f"{fn}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InputTypeError(f"{fn}: {name} must be a bool, got {type_name(value)}")
    return value


def check_positive_int(fn: str, name: str, value, *, odd: bool = False) -> int:
    """``value`` is an int >= 1 (and odd if ``odd``): a channel count, a head count, a kernel size."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{fn}: {name} must be an int, got {type_name(value)}")
    if value < 1 or (odd and value % 2 != 1):
        raise InputError(f"{fn}: {name} must be {'odd and ' if odd else ''}>= 1, got {value}")
    return int(value)


def check_nonnegative_float(fn: str, name: str, value) -> float:
    """``value`` is a finite real number >= 0 (an epsilon)."""
    if not _real(value):
        raise InputTypeError(f"{fn}: {name} must be a float, got {type_name(value)}")
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"{fn}: {name} must be a finite float >= 0, got {value}")
    return float(value)


def check_finite_float(fn: str, name: str, value, *, positive: bool = False) -> float:
    """``value`` is a finite real number (and > 0 if ``positive``): a formula's coefficient."""
    if not _real(value):
        raise InputTypeError(f"{fn}: {name} must be a float, got {type_name(value)}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise InputError(f"{fn}: {name} must be a finite float{' > 0' if positive else ''}, got {value}")
    return float(value)
