"""Choosing a launch config among a kernel's small candidate set by timing it on the GPU.

Each launcher lists a few tile configs per dtype class and head size (all compiled ahead of time
in tests/test_compile.py); the first time a problem of a new kind runs, :func:`pick` times each
candidate with ``triton.testing.do_bench`` and remembers the fastest for that kind. The kind
(``key``) holds everything that changes which tile wins: kernel, dtype, head sizes, the variant
flags, and power-of-two buckets of the sequence lengths and of batch x heads, so varying lengths
do not retune on every call.

This sits in the launchers rather than in ``triton.autotune`` because the latter keys only on
kernel arguments (the length buckets would need dummy arguments) and because the backward's
atomically accumulated mask gradient must be cleared after the timed runs, which the launcher
knows how to do; it also behaves the same on every triton from 3.6 to 3.9.

``ATTN_FAST_AUTOTUNE=0`` turns timing off: every launch takes its first candidate (no warm-up
cost, and the same config on every run, for CUDA-graph capture or bitwise reproducibility across
processes). Deterministic mode (``torch.use_deterministic_algorithms(True)``, or a launcher called
with ``deterministic=True``) does the same: the tile shapes fix the order of the floating-point sums,
so a config picked by timing could differ from one process to the next, and so could the last bits.
"""
from __future__ import annotations

import os
import threading
import contextlib
from typing import Callable, Dict, Hashable, Iterator, Optional, Sequence, Tuple

import torch
import triton

__all__ = ["Config", "bench", "bucket", "clear_cache", "enabled", "forced", "pick"]

#: (BLOCK_M, BLOCK_N, num_warps, num_stages)
Config = Tuple[int, int, int, int]

_CACHE: Dict[Hashable, Config] = {}
#: While :func:`forced` is on: the config each kind of launch takes (by the first element of its
#: key, e.g. "attn_fwd"); kinds not named take their first candidate. Nothing is timed.
_FORCED: Optional[Dict[str, Config]] = None
#: Held while candidates are timed: threads that meet a new kind of problem at once time it once, one
#: after the other, and not while another thread's timing runs on the same GPU (which would skew it).
_TIMING = threading.RLock()


def enabled(deterministic: bool = False) -> bool:
    """Whether :func:`pick` times candidates: ``ATTN_FAST_AUTOTUNE`` (default on), and not in
    deterministic mode (``deterministic`` or ``torch.are_deterministic_algorithms_enabled()``)."""
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return False
    return os.environ.get("ATTN_FAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 16): the tuning key of a length or a count."""
    return max(16, triton.next_power_of_2(max(1, n)))


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn()``: a short timing (a tuning step, not a benchmark)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median")


def pick(key: Hashable, candidates: Sequence[Config], launch: Callable[[Config], object], *,
         deterministic: bool = False) -> Config:
    """The fastest of ``candidates`` for problems of kind ``key``; ``launch(cfg)`` runs the kernel(s)
    with ``cfg`` on the caller's real arguments (so its outputs are overwritten by the caller's own
    launch afterwards). Timed once per key and process; with one candidate, or tuning off, the
    first candidate (also in deterministic mode, see :func:`enabled`)."""
    if _FORCED is not None:
        return _forced_choice(key, candidates)
    if len(candidates) == 1 or not enabled(deterministic):
        return candidates[0]
    cfg = _CACHE.get(key)
    if cfg is not None:
        return cfg
    with _TIMING:
        cfg = _CACHE.get(key)  # another thread may have timed it while this one waited
        if cfg is None:
            times = [bench(lambda c=c: launch(c)) for c in candidates]
            cfg = candidates[min(range(len(times)), key=times.__getitem__)]
            _CACHE[key] = cfg
    return cfg


def clear_cache() -> None:
    """Forget every choice (the next launch of each kind times its candidates again)."""
    _CACHE.clear()


@contextlib.contextmanager
def forced(choices: Dict[str, Config]) -> Iterator[None]:
    """Within the block, every :func:`pick` returns the config ``choices`` names for its kind (the
    first element of its key), or its first candidate, without timing anything. The compile gate
    (kernels/aot.py) makes the launchers' real calls this way, one candidate at a time. A named
    config that is not among the launch's candidates is an error: the gate then knows the tables
    and its cases disagree."""
    global _FORCED
    previous, _FORCED = _FORCED, dict(choices)
    try:
        yield
    finally:
        _FORCED = previous


def _forced_choice(key: Hashable, candidates: Sequence[Config]) -> Config:
    kind = key[0] if isinstance(key, tuple) and key else key
    cfg = _FORCED.get(kind) if _FORCED is not None else None
    if cfg is None:
        return candidates[0]
    if tuple(cfg) not in [tuple(c) for c in candidates]:
        raise ValueError(f"forced config {cfg} for {kind} is not one of its candidates {list(candidates)}")
    return tuple(cfg)
