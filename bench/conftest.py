"""pytest-benchmark files of the benchmark suite: ``pytest bench/ --benchmark-only``.

They time the same cases and implementations as ``python -m bench`` (``bench/cases.py``,
``bench/impls.py``): on a GPU the quick shapes, on a CPU the small ones (the CPU path). Each test is
one (case, dtype, direction, implementation); a competitor that cannot run here is skipped with its
reason. ``python -m bench`` remains the full report (roofline, peak memory, correctness, plots).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List

import pytest
import torch

from bench import cases as C
from bench import impls as I
from bench import measure as M

#: ATTN_FAST_BENCH_DEVICE=cpu benchmarks the CPU path on a GPU machine too
DEVICE = torch.device(os.environ.get("ATTN_FAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
MODE = "quick" if DEVICE.type == "cuda" else "cpu"
DTYPES = ["fp16", "bf16"] if DEVICE.type == "cuda" else ["fp32"]


def params(families: List[str], impls: List[str]) -> Iterator[Any]:
    """pytest params (case, dtype, direction, impl) with readable ids."""
    for family in families:
        for case in C.cases(family, MODE):
            for dtype in DTYPES:
                for direction in case.directions:
                    for impl in impls:
                        yield pytest.param(case, dtype, direction, impl,
                                           id=f"{case.label}-{dtype}-{direction}-{impl}".replace(" ", "_"))


def run_benchmark(benchmark, case: C.Case, dtype: str, direction: str, impl: str) -> None:
    torch.manual_seed(0)
    inputs: Dict[str, Any] = C.make_inputs(case, C.DTYPES[dtype], DEVICE, requires_grad=direction != "fwd")
    try:
        prep = I.prepare(impl, case, inputs)
        fn = M.directed(prep, direction)
    except I.Unavailable as e:
        pytest.skip(f"{impl}: {e}")
    except torch.cuda.OutOfMemoryError:
        if impl == I.OURS:
            raise
        pytest.skip(f"{impl}: out of memory")  # a competitor that materialises Lq x Lk

    def timed():
        for t in prep.leaves:
            t.grad = None
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    timed()  # warm-up (compilation, autotuning)
    benchmark.extra_info.update(device=str(DEVICE), impl=impl, **(C.work(case, C.DTYPES[dtype], direction) or {}))
    benchmark.group = f"{case.family} {case.label} {dtype} {direction}"
    benchmark.pedantic(timed, rounds=10 if DEVICE.type == "cuda" else 3, warmup_rounds=1)
