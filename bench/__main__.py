"""The benchmark runner (``make bench``, ``python -m bench``): how much faster than the competitors,
how close to the hardware limit, and is it still correct? (DESIGN.md section 6.)

On a GPU it times attn_fast and every competitor on the same inputs (``bench/impls.py``), forward,
backward and both, with peak memory, throughput as a percentage of the roofline measured in the same
run, and checks attn_fast's output and gradients against the float64 reference. On a CPU-only machine
it times the CPU path against the reference and torch's own CPU ops on small shapes, verifies every
Triton kernel under the interpreter (correctness table), and says that GPU figures need a GPU.

Each run writes ``bench/results/<device>/<stamp>[-<tag>].json``, ``.md`` and PNG plots.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import torch

import attn_fast

from . import cases as C
from . import impls as I
from . import measure as M
from . import models
from . import report

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = {"attention": ["attention", "decode", "cross"], "se": ["se"], "cbam": ["cbam"], "model": ["model"]}


def environment(device: torch.device) -> Dict[str, Any]:
    import triton

    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name = _cpu_name()
        cap = None
    return {"device": device.type, "device_name": name, "capability": cap, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "attn_fast": attn_fast.__version__, "git": git, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.time()

    def step(self, text: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total} {time.time() - self.start:6.0f}s] {text}", file=sys.stderr, flush=True)


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # give the next row the whole GPU (a full collection costs ~1 s on the CPU)
        gc.collect()
        torch.cuda.empty_cache()


def _error_row(base: Dict[str, Any], err: BaseException) -> Dict[str, Any]:
    if isinstance(err, I.Unavailable):
        return dict(base, status="unavailable", reason=str(err))
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return dict(base, status="oom", reason="out of memory")
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return dict(base, status="error", reason=f"{type(err).__name__}: {first}")


def bench_case(case: C.Case, dtype_name: str, direction: str, impl_names: List[str], device: torch.device,
               rep_ms: float, progress: Progress, check: bool) -> List[Dict[str, Any]]:
    """Every implementation on one (case, dtype, direction), on the same inputs."""
    dtype = C.DTYPES[dtype_name]
    rows: List[Dict[str, Any]] = []
    torch.manual_seed(0)
    try:
        inputs = C.make_inputs(case, dtype, device, requires_grad=direction != "fwd")
    except torch.cuda.OutOfMemoryError as e:
        for name in impl_names:
            progress.step(f"{case.family} {case.label} {dtype_name} {direction} {name}: inputs OOM")
        base = dict(family=case.family, op=case.op, case=case.label, dtype=dtype_name, direction=direction)
        return [_error_row(dict(base, impl=n), e) for n in impl_names]
    work = C.work(case, dtype, direction) or {}
    timings = _interleaved(case, inputs, direction, impl_names) if device.type != "cuda" else {}
    for name in impl_names:
        base = dict(family=case.family, op=case.op, case=case.label, series=case.series, x=case.x,
                    source=case.source, params=case.params, dtype=dtype_name, direction=direction, impl=name, **work)
        try:
            if isinstance(timings.get(name), BaseException):
                raise timings[name]
            prep = I.prepare(name, case, inputs)
            fn = M.directed(prep, direction)
            fn()  # warm-up: compiles, autotunes
            peak = M.peak_memory(fn, device)
            t = timings[name] if name in timings else M.time_call(fn, device, prep.leaves, rep_ms=rep_ms)
            row = dict(base, status="ok", ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, peak_bytes=peak)
            if t.noisy:
                row["noisy"] = True
            if name == I.OURS and check:
                out = prep.call() if direction == "fwd" else None
                if out is not None:
                    try:
                        row["check"] = M.check(case, inputs, _public(case), M.REFERENCES[case.op], out)
                    except Exception as e:  # a failing check must show, not stop the run
                        row["check"] = {"error": f"{type(e).__name__}: {e}"}
            del prep, fn
        except Exception as e:  # noqa: BLE001 - every failure becomes a row
            row = _error_row(base, e)
        rows.append(row)
        _free(device)
        progress.step(_describe(row))
    return rows


def _interleaved(case: C.Case, inputs, direction: str, impl_names: List[str]) -> Dict[str, Any]:
    """CPU: every implementation of one row timed in turn, round after round (measure.time_interleaved),
    so a load on the machine falls on all of them alike; an implementation that cannot run maps to
    its exception (its row says why)."""
    fns, leaves, out = {}, {}, {}
    for name in impl_names:
        try:
            prep = I.prepare(name, case, inputs)
            fn = M.directed(prep, direction)
            fn()  # warm-up
            fns[name], leaves[name] = fn, prep.leaves
        except Exception as e:  # noqa: BLE001 - reported on the row
            out[name] = e
    if fns:
        out.update(M.time_interleaved(fns, leaves))
    return out


def _public(case: C.Case):
    return {"scaled_dot_product_attention": attn_fast.scaled_dot_product_attention,
            "squeeze_excite": attn_fast.squeeze_excite, "cbam": attn_fast.cbam}[case.op]


def _describe(row: Dict[str, Any]) -> str:
    head = f"{row['family']} {row['case']} {row['dtype']} {row['direction']} {row['impl']}"
    if row.get("ms") is None:
        return f"{head}: {row['status']} ({row.get('reason', '')})"
    text = f"{head}: {row['ms']:.4g} ms"
    if row.get("peak_bytes") is not None:
        text += f", peak {row['peak_bytes'] / 2 ** 20:.1f} MiB"
    chk = row.get("check")
    if chk:
        text += ", check ERROR" if "error" in chk else (", correct" if chk["fwd_ok"] and chk["grad_ok"] else ", WRONG")
    return text


def bench_models(model_cases: List[C.Case], dtypes: List[str], device: torch.device, rep_ms: float,
                 impl_names: List[str], progress: Progress) -> List[Dict[str, Any]]:
    rows = []
    for case in model_cases:
        for dtype_name in dtypes:
            dtype = C.DTYPES[dtype_name]
            torch.manual_seed(0)
            base_model = None
            timings: Dict[str, Any] = {}
            if device.type != "cuda":  # the steps interleaved, as bench_case's rows
                try:
                    base_model = models.build(case.params, device)
                    steps = {}
                    for name in impl_names:
                        try:
                            steps[name] = models.prepare_step(name, case.params, dtype, device, base_model)
                            steps[name]()
                        except Exception as e:  # noqa: BLE001 - reported on the row
                            timings[name] = e
                    timings.update(M.time_interleaved(steps, {}, min_calls=3, budget_s=2.0) if steps else {})
                    del steps
                except Exception as e:  # noqa: BLE001 - the model cannot be built: every row says why
                    timings = {name: e for name in impl_names}
            for name in impl_names:
                base = dict(family="model", op="model", case=case.label, series=case.series, x=0.0,
                            source=case.source, params=case.params, dtype=dtype_name, direction=case.directions[0], impl=name)
                try:
                    if isinstance(timings.get(name), BaseException):
                        raise timings[name]
                    if base_model is None:
                        base_model = models.build(case.params, device)
                    step = models.prepare_step(name, case.params, dtype, device, base_model)
                    step()
                    peak = M.peak_memory(step, device)
                    t = timings[name] if name in timings else M.time_call(step, device, rep_ms=rep_ms, min_calls=3,
                                                                          budget_s=2.0)
                    row = dict(base, status="ok", ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, peak_bytes=peak)
                    if t.noisy:
                        row["noisy"] = True
                    del step
                except Exception as e:  # noqa: BLE001
                    row = _error_row(base, e)
                rows.append(row)
                _free(device)
                progress.step(_describe(row))
            del base_model
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=list(GROUPS), default=list(GROUPS),
                        help="op groups (attention = self, decode and cross attention)")
    parser.add_argument("--families", nargs="+", choices=C.FAMILIES, help="finer than --ops")
    parser.add_argument("--dtypes", nargs="+", choices=list(C.DTYPES),
                        help="default fp16 bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--directions", nargs="+", choices=C.DIRECTIONS, default=list(C.DIRECTIONS))
    parser.add_argument("--impls", nargs="+", help="implementations to time (default: all; attn_fast always)")
    parser.add_argument("--match", help="only cases whose label contains this text (e.g. 'E128', 'nhwc')")
    parser.add_argument("--quick", action="store_true", help="a few shapes per family (GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's timed window per row (GPU)")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check of attn_fast's rows")
    parser.add_argument("--profile", choices=["core", "all", "none"], default="core",
                        help="static profile table of the kernels (cached while kernels/ is unchanged)")
    parser.add_argument("--interpreter", choices=["auto", "on", "off"], default="auto",
                        help="correctness table of the Triton kernels under the interpreter (auto: on the CPU)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    parser.add_argument("--tag", default="", help="suffix of the file names (e.g. the part of bench/gpu.sh)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    mode = "cpu" if device.type != "cuda" else ("quick" if args.quick else "full")
    dtypes = args.dtypes or (["fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    families = args.families or [f for g in args.ops for f in GROUPS[g]]
    env = environment(device)
    print(f"attn_fast {env['attn_fast']} | torch {env['torch']} | triton {env['triton']} | {env['device_name']}"
          f" | mode {mode}", file=sys.stderr)
    if device.type != "cuda":
        print("No GPU here: this run times the CPU path (torch's fused CPU attention; its own for SE; the "
              "PyTorch reference for ECA and CBAM) against torch's own CPU ops on small shapes and checks the Triton kernels under the interpreter. GPU figures need "
              "a GPU: run bench/gpu.sh on a GPU machine.", file=sys.stderr)

    work = []
    for family in families:
        for case in C.cases(family, mode, args.match):
            if family == "model":
                continue
            names = [n for n in I.impl_names(family) if n == I.OURS or n in args.impls] if args.impls else \
                [n for n in I.impl_names(family) if device.type == "cuda" or not n.endswith("+compile")]
            for dtype_name in dtypes:
                for direction in [d for d in args.directions if d in case.directions]:
                    work.append((case, dtype_name, direction, names))
    model_cases = C.cases("model", mode, args.match) if "model" in families else []
    model_impls = [n for n in models.MODEL_IMPLS if n == I.OURS or n in args.impls] if args.impls else \
        [n for n in models.MODEL_IMPLS if device.type == "cuda" or not n.endswith("+compile")]
    total = sum(len(w[3]) for w in work) + len(model_cases) * len(dtypes) * len(model_impls)
    progress = Progress(total)

    torch.manual_seed(0)
    peaks = M.roofline(device)
    print(f"roofline: matmul {peaks['matmul_flops'] / 1e12:.3g} TFLOP/s, copy "
          f"{peaks['copy_bytes_per_s'] / 1e9:.3g} GB/s", file=sys.stderr)
    rows: List[Dict[str, Any]] = []
    checked = set()
    for case, dtype_name, direction, names in work:
        key = (case.label, dtype_name)
        do_check = not args.no_check and direction == "fwd" and key not in checked
        checked.add(key)
        rows += bench_case(case, dtype_name, direction, names, device, args.rep_ms, progress, do_check)
    rows += bench_models(model_cases, dtypes, device, args.rep_ms, model_impls, progress)
    # measured again at the end: the peaks are the best of both (a machine loaded at the start must not
    # make the rows' percentages of them look better than the hardware allows)
    peaks = M.best_roofline(peaks, M.roofline(device))
    checks = {(r["case"], r["dtype"]): r["check"] for r in rows if r.get("check")}
    for r in rows:
        report.add_throughput(r, peaks)
        if r["impl"] == I.OURS and (r["case"], r["dtype"]) in checks:
            r["check"] = checks[(r["case"], r["dtype"])]  # the check covers every direction of the case
    report.add_speedups(rows)

    run: Dict[str, Any] = {"env": env, "mode": mode, "roofline": peaks, "rows": rows,
                           "argv": sys.argv[1:] if argv is None else list(argv), "notes": []}
    if device.type != "cuda" and not args.impls:
        run["notes"].append("The torch.compile competitors are left out on the CPU by default (inductor's C++ "
                            "build takes minutes per shape); `--impls reference+compile ...` adds them.")
    interpret = args.interpreter == "on" or (args.interpreter == "auto" and device.type != "cuda")
    if interpret:
        from .interpreter_check import run_in_subprocess

        print("== Triton kernels under the interpreter (small shapes)", file=sys.stderr, flush=True)
        run["interpreter"] = run_in_subprocess(["fp32", "fp16", "bf16"], quick=False)
    try:
        from .static_profile import static_profile

        run["static_profile"] = static_profile(args.profile)
    except Exception as e:  # noqa: BLE001 - no ptxas here, say so in the report
        run["static_profile"] = {"rows": [], "note": f"static profile unavailable: {type(e).__name__}: {e}"}

    folder = os.path.join(args.out, report.slug(env["device_name"]))
    os.makedirs(folder, exist_ok=True)
    stem = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{report.slug(args.tag)}" if args.tag else "")
    report.write_json(os.path.join(folder, stem + ".json"), run)
    md = report.markdown(run)
    with open(os.path.join(folder, stem + ".md"), "w") as f:
        f.write(md + "\n")
    pngs = [] if args.no_plots else report.plots(run, folder, stem)
    print(md)
    print(f"\nwrote {os.path.join(folder, stem)}.json, .md and {len(pngs)} plot(s)", file=sys.stderr)

    wrong = [r for r in rows if r.get("check") and ("error" in r["check"] or not (r["check"]["fwd_ok"] and r["check"]["grad_ok"]))]
    ours_failed = [r for r in rows if r["impl"] == I.OURS and r.get("status") not in ("ok",)]
    interp_bad = bool(run.get("interpreter")) and (
        any(not r["ok"] for r in run["interpreter"]["rows"]) or run["interpreter"]["kernels_unreached"])
    if wrong or ours_failed or interp_bad:
        print(f"FAILED: {len(wrong)} attn_fast rows wrong, {len(ours_failed)} attn_fast rows did not run"
              + (", interpreter table has failures" if interp_bad else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
