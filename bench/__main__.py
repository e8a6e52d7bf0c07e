"""The benchmark runner (``make bench``). On every machine it checks each op's public function
against its float64 reference by the numerics rule and times it; GPU timing, competitors, plots and
the roofline come with the benchmark suite (issue 7)."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import List, Optional

import torch

import attn_fast
from attn_fast.dispatch import route
from attn_fast.numerics import compare

from .cases import OPS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _to(inputs, dtype=None, device=None):
    return {k: (v.to(device=device, dtype=dtype if dtype and v.is_floating_point() else v.dtype)
                if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def run(ops: List[str], dtypes: List[str], repeats: int, device: torch.device) -> int:
    print(f"attn_fast {attn_fast.__version__} | torch {torch.__version__} | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    if device.type != "cuda":
        print("No CUDA device: this run checks and times the CPU path. GPU figures need a GPU.")
    print()
    head = f"{'op':<30} {'case':<32} {'dtype':<5} {'path':<9} {'max err':>9} {'bound':>9} {'ok':<4} {'ms':>9}"
    print(head)
    print("-" * len(head))
    failures = 0
    for op in ops:
        public, ref, cases = OPS[op]
        for name in dtypes:
            dtype = DTYPES[name]
            for label, inputs in cases(dtype):
                inputs = _to(inputs, device=device)
                path = route(op, device, dtype, warn=False).path
                out = public(**inputs)
                ref_lp = ref(**inputs)
                ref64 = ref(**_to(inputs, torch.float64))
                cmp = compare(out, ref64, ref_lp)
                failures += not cmp.passed
                ms = _median_ms(lambda: public(**inputs), repeats)
                print(f"{op:<30} {label:<32} {name:<5} {path:<9} {cmp.err_fast:9.2e} {cmp.bound:9.2e} "
                      f"{'yes' if cmp.passed else 'NO':<4} {ms:9.3f}", flush=True)
    print()
    print("all rows pass the numerics rule" if not failures else f"{failures} rows FAIL the numerics rule")
    return 1 if failures else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    return run(args.ops, args.dtypes, args.repeats, torch.device(args.device))


if __name__ == "__main__":
    sys.exit(main())
