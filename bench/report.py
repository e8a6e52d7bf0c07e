"""What a benchmark run writes under ``bench/results/<device>/``: ``<stamp>.json`` (every row and the
run's environment), ``<stamp>.md`` (the tables) and ``<stamp>-<family>-<dtype>-<direction>.png``
(time and throughput against sequence length or tensor size, one line per implementation, the
roofline as a dashed line).

Row fields: family, op, case, series, x, dtype, direction, impl, status ("ok", "unavailable",
"error", "oom"), reason, ms (median), ms_p20, ms_p80, peak_bytes, flop or bytes (the work, DESIGN.md
section 6), tflops or gbps, pct_roofline, and on attn_fast's rows ``speedup`` (competitor time over
attn_fast time, per competitor) and ``check`` (the numerics rule on the output and gradients).
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .impls import OURS


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "device"


def add_throughput(row: Dict[str, Any], peaks: Dict[str, float]) -> None:
    """TFLOP/s or GB/s and the percentage of the measured roofline, from the row's work and time."""
    if row.get("ms") is None:
        return
    seconds = row["ms"] * 1e-3
    if row.get("flop"):
        row["tflops"] = row["flop"] / seconds / 1e12
        row["pct_roofline"] = 100.0 * row["flop"] / seconds / peaks["matmul_flops"]
    elif row.get("bytes"):
        row["gbps"] = row["bytes"] / seconds / 1e9
        row["pct_roofline"] = 100.0 * row["bytes"] / seconds / peaks["copy_bytes_per_s"]


def add_speedups(rows: List[Dict[str, Any]]) -> None:
    """On each attn_fast row, ``speedup[impl]`` = impl's time / attn_fast's time for the same case,
    dtype and direction; on each competitor row, ``attn_fast_speedup`` the same ratio."""
    groups: Dict[Tuple, Dict[str, Dict[str, Any]]] = OrderedDict()
    for r in rows:
        groups.setdefault((r["family"], r["case"], r["dtype"], r["direction"]), {})[r["impl"]] = r
    for group in groups.values():
        ours = group.get(OURS)
        if ours is None or ours.get("ms") is None:
            continue
        ours["speedup"] = {}
        for name, r in group.items():
            if name != OURS and r.get("ms") is not None:
                ratio = r["ms"] / ours["ms"]
                ours["speedup"][name] = ratio
                r["attn_fast_speedup"] = ratio


def write_json(path: str, run: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(run, f, indent=1, default=str)


# ------------------------------------------------------------------------------------------ markdown
def _fmt(v: Optional[float], spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _mib(v: Optional[int]) -> str:
    return "n/a" if v is None else f"{v / 2 ** 20:.1f}"


def _check_cell(check: Optional[Dict[str, Any]]) -> str:
    if not check:
        return "-"
    if "error" in check:
        return "ERROR"
    ok = check["fwd_ok"] and check["grad_ok"]
    ratio = max(check["fwd_err"] / max(check["fwd_bound"], 1e-300), check["grad_err"] / max(check["grad_bound"], 1e-300))
    return f"{'yes' if ok else 'NO'} ({ratio:.2f} of bound)"


def _ms(row: Dict[str, Any]) -> str:
    """A row's median time; ``~`` marks a noisy one (its p80 / p20 beyond measure.NOISY_SPREAD)."""
    return f"{row['ms']:.3g}{'~' if row.get('noisy') else ''}"


def family_table(rows: List[Dict[str, Any]], family: str) -> str:
    """One line per (case, dtype, direction): attn_fast's time, throughput, % of roofline, peak memory,
    correctness, then each competitor's time and attn_fast's speed-up over it."""
    rows = [r for r in rows if r["family"] == family]
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows if r["impl"] != OURS))
    impls = [i for i in impls if any(r["impl"] == i and r.get("ms") is not None for r in rows)]
    unit = "TFLOP/s" if any(r.get("flop") for r in rows) else "GB/s"
    head = ["case", "dtype", "dir", "attn_fast ms", unit, "% roofline", "peak MiB", "correct"]
    head += [f"{i} ms (speed-up)" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: Dict[Tuple, Dict[str, Dict[str, Any]]] = OrderedDict()
    for r in rows:
        groups.setdefault((r["case"], r["dtype"], r["direction"]), {})[r["impl"]] = r
    for (case, dtype, direction), group in groups.items():
        ours = group.get(OURS, {})
        tp = ours.get("tflops") if unit == "TFLOP/s" else ours.get("gbps")
        cells = [case, dtype, direction, _ms(ours) if ours.get("ms") is not None else ours.get("status", "-"),
                 _fmt(tp), _fmt(ours.get("pct_roofline"), ".1f"), _mib(ours.get("peak_bytes")),
                 _check_cell(ours.get("check"))]
        for i in impls:
            r = group.get(i)
            if r is None:
                cells.append("-")
            elif r.get("ms") is None:
                cells.append(r.get("status", "-"))
            else:
                sp = r.get("attn_fast_speedup")
                cells.append(f"{_ms(r)} ({sp:.2f}x)" if sp is not None else _ms(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_table(rows: List[Dict[str, Any]]) -> str:
    rows = [r for r in rows if r["family"] == "model"]
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    head = ["model", "dtype"] + [f"{i} ms/step" for i in impls] + [f"speed-up over {i}" for i in impls if i != OURS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: Dict[Tuple, Dict[str, Dict[str, Any]]] = OrderedDict()
    for r in rows:
        groups.setdefault((r["case"], r["dtype"]), {})[r["impl"]] = r
    for (case, dtype), group in groups.items():
        cells = [case, dtype]
        cells += [_fmt(group[i].get("ms")) if i in group and group[i].get("ms") is not None
                  else (group[i].get("status", "-") if i in group else "-") for i in impls]
        sp = group.get(OURS, {}).get("speedup", {})
        cells += [f"{sp[i]:.2f}x" if i in sp else "-" for i in impls if i != OURS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unavailable_lines(rows: Iterable[Dict[str, Any]]) -> List[str]:
    seen: Dict[Tuple[str, str], int] = OrderedDict()
    for r in rows:
        if r.get("status") not in (None, "ok"):
            key = (r["impl"], f"{r['status']}: {r.get('reason', '')}".strip())
            seen[key] = seen.get(key, 0) + 1
    return [f"- {impl}: {why} ({n} row{'s' if n > 1 else ''})" for (impl, why), n in seen.items()]


FAMILY_TITLES = OrderedDict([
    ("attention", "Self attention (B x L = 16k tokens)"), ("decode", "Decoding (Lq = 1)"),
    ("cross", "Cross attention (Lq != Lk)"), ("se", "Squeeze-and-excitation layers"), ("cbam", "CBAM layers"),
    ("model", "Whole models: training steps (forward + backward + SGD step) and inference (a no_grad forward)")])


def markdown(run: Dict[str, Any]) -> str:
    env, rows, peaks = run["env"], run["rows"], run["roofline"]
    out = [f"# attn_fast benchmark: {env['device_name']}", "",
           f"{env['date']} · attn_fast {env['attn_fast']} ({env.get('git', '?')}) · torch {env['torch']} · "
           f"triton {env['triton']} · CUDA {env.get('cuda') or '-'} · mode {run['mode']}", ""]
    if env["device"] == "cpu":
        out += ["**No GPU here: these rows time the CPU path (torch's fused CPU kernels for attention, its "
                "own for SE, the PyTorch reference for ECA and CBAM) against torch's own CPU ops, each row's implementations "
                "interleaved call by call. GPU figures need a GPU: run `bench/gpu.sh` on a GPU machine.**", "",
                "On the CPU, `~` after a time marks a noisy row (its 80th percentile over 1.25x its 20th); "
                "`peak MiB` counts the tensors alive at once during one call (fused kernels' scratch unseen); "
                "the roofline is the best of two measurements, at the start and the end of the run, and a "
                "`% roofline` above 100 means the op's data fit in a cache (the copy peak is a 64 MiB copy).", ""]
    out += [f"Roofline measured in this run: matmul {peaks['matmul']} **{peaks['matmul_flops'] / 1e12:.3g} TFLOP/s**; "
            f"copy {peaks['copy']} **{peaks['copy_bytes_per_s'] / 1e9:.3g} GB/s** (read + write).", "",
            "Times are medians in ms; `speed-up` is the competitor's time over attn_fast's (above 1: attn_fast "
            "is faster); `% roofline` is attn_fast's FLOP/s (attention) or bytes/s (SE, CBAM: the fewest "
            "bytes the op must move) over the measured peak; `peak MiB` is the memory one call allocates "
            "beyond its inputs; `correct` applies the numerics rule (DESIGN.md section 5) to the output and "
            "every gradient against the float64 reference (its worst error as a fraction of the bound).", ""]
    for family, title in FAMILY_TITLES.items():
        if any(r["family"] == family for r in rows):
            out += [f"## {title}", "", model_table(rows) if family == "model" else family_table(rows, family), ""]
    out += [f"{note}" for note in run.get("notes", [])] + ([""] if run.get("notes") else [])
    missing = unavailable_lines(rows)
    if missing:
        out += ["## Not timed", ""] + missing + [""]
    if run.get("interpreter"):
        from .interpreter_check import format_table

        out += ["## Triton kernels under the interpreter (correctness on small shapes)", "",
                format_table(run["interpreter"]), ""]
    if run.get("static_profile"):
        from attn_fast.kernels.aot import format_table as profile_table

        prof = run["static_profile"]
        out += ["## Static profile of the kernels (sm_80 / sm_90, compiled ahead of time)", "",
                prof["note"], "", profile_table(prof["rows"]), ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- plots
def plots(run: Dict[str, Any], folder: str, stem: str) -> List[str]:
    """One PNG per (family, dtype, direction): a row of two panels per series (time; throughput with
    the roofline). Returns the paths written; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in run["rows"] if r["family"] != "model" and r.get("ms") is not None]
    peaks = run["roofline"]
    written = []
    keys = OrderedDict.fromkeys((r["family"], r["dtype"], r["direction"]) for r in rows)
    for family, dtype, direction in keys:
        sel = [r for r in rows if (r["family"], r["dtype"], r["direction"]) == (family, dtype, direction)]
        series = list(OrderedDict.fromkeys(r["series"] for r in sel))
        attention = family in ("attention", "decode", "cross")
        fig, axes = plt.subplots(len(series), 2, figsize=(12, 3.6 * len(series)), squeeze=False)
        for row_axes, s in zip(axes, series):
            sr = [r for r in sel if r["series"] == s]
            for impl in OrderedDict.fromkeys(r["impl"] for r in sr):
                pts = sorted((r["x"], r["ms"], r.get("tflops") if attention else r.get("gbps"))
                             for r in sr if r["impl"] == impl)
                style = dict(marker="o", linewidth=2.5 if impl == OURS else 1.2, label=impl)
                row_axes[0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
                row_axes[1].plot([p[0] for p in pts], [p[2] for p in pts], **style)
            peak = peaks["matmul_flops"] / 1e12 if attention else peaks["copy_bytes_per_s"] / 1e9
            row_axes[1].axhline(peak, color="k", linestyle="--", linewidth=1, label="roofline (measured)")
            xlabel = {"attention": "sequence length L", "decode": "key length Lk",
                      "cross": "Lq x Lk"}.get(family, "elements of x (N*C*H*W)")
            for ax, ylabel in zip(row_axes, ["time (ms, median)", "TFLOP/s" if attention else "GB/s"]):
                ax.set_xscale("log", base=2 if attention else 10)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{family} {s} {dtype} {direction}")
                ax.grid(True, alpha=0.3)
            row_axes[0].set_yscale("log")
            top = max([peak] + [r.get("tflops") or r.get("gbps") or 0.0 for r in sr])
            row_axes[1].set_ylim(0, 1.1 * top)
        axes[0][1].legend(fontsize=7, loc="best")
        fig.suptitle(f"attn_fast vs competitors on {run['env']['device_name']} ({run['env']['date']})")
        fig.tight_layout()
        path = os.path.join(folder, f"{stem}-{family}-{dtype}-{slug(direction)}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
