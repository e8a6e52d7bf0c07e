"""The benchmark suite (bench/): its shapes and work formulas, its report, and one small end-to-end
run of ``python -m bench`` and of ``pytest bench/ --benchmark-only`` on this machine."""
from __future__ import annotations

import json
import time
import os
import subprocess
import sys

import pytest
import torch

from bench import cases as C
from bench import report
from bench.static_profile import source_key, static_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_flops_follow_design():
    p = dict(B=2, H=3, Lq=128, Lk=256, E=64, causal=False)
    fwd = 4 * 2 * 3 * 128 * 256 * 64
    assert C.attention_flops(p, "fwd") == fwd
    assert C.attention_flops(p, "bwd") == 2.5 * fwd
    assert C.attention_flops(p, "fwd+bwd") == 3.5 * fwd
    assert C.attention_flops(dict(p, causal=True), "fwd") == fwd / 2


def test_image_bytes_count_x_reads_and_writes():
    p = dict(N=2, C=8, H=4, W=4)
    assert C.image_bytes(p, torch.float16, "fwd") == 2 * 256 * 2
    assert C.image_bytes(p, torch.float32, "bwd") == 3 * 256 * 4


def test_full_suite_covers_the_issue_shapes():
    att = C.cases("attention", "full")
    lengths = {c.params["Lq"] for c in att}
    assert min(lengths) == 512 and max(lengths) == 16384
    assert {c.params["E"] for c in att} == {64, 128} and {c.params["causal"] for c in att} == {False, True}
    assert all(c.params["B"] * c.params["Lq"] == C.TOKENS for c in att)
    assert all(c.params["Lq"] == 1 and c.directions == ("fwd",) for c in C.cases("decode", "full"))
    assert all(c.params["Lq"] != c.params["Lk"] for c in C.cases("cross", "full"))
    for fam, models in (("se", {"seresnet50", "efficientnet_b0", "mobilenetv3_large_100"}), ("cbam", {"cbam_resnet50"})):
        found = C.cases(fam, "full")
        assert {c.source for c in found} == models
        assert {c.params["N"] for c in found} == {64, 256} and {c.params["layout"] for c in found} == {"nchw", "nhwc"}
    assert {c.params["model"] for c in C.cases("model", "full")} >= {"seresnet50", "transformer_encoder"}
    with pytest.raises(ValueError, match="family"):
        C.cases("nope", "full")


def test_se_layer_table_matches_timm_models():
    """The SE shapes were read off timm's models: check them again (channels, map size, reduced width)."""
    timm = pytest.importorskip("timm")
    for name, spec in C.SE_LAYERS.items():
        model = timm.create_model(name).eval()
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(
            (i[0].shape[1], i[0].shape[2], (getattr(m, "fc1", None) or m.conv_reduce).out_channels)))
            for m in model.modules() if type(m).__name__ in ("SEModule", "SqueezeExcite")]
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        for h in hooks:
            h.remove()
        assert sorted(set(seen)) == sorted(spec["layers"]), name


def _row(impl, ms, **kw):
    return dict(family="se", case="c", dtype="fp16", direction="fwd", impl=impl, ms=ms, status="ok", **kw)


def test_speedups_and_throughput():
    rows = [_row("attn_fast", 2.0, bytes=4e9), _row("timm", 5.0, bytes=4e9), _row("reference", None, bytes=4e9)]
    rows[2]["status"] = "unavailable"
    peaks = {"matmul_flops": 1e15, "copy_bytes_per_s": 4e12}
    for r in rows:
        report.add_throughput(r, peaks)
    report.add_speedups(rows)
    assert rows[0]["gbps"] == pytest.approx(2000.0) and rows[0]["pct_roofline"] == pytest.approx(50.0)
    assert rows[0]["speedup"] == {"timm": pytest.approx(2.5)}
    assert rows[1]["attn_fast_speedup"] == pytest.approx(2.5)
    assert "pct_roofline" not in rows[2]
    table = report.family_table(rows, "se")
    assert "2.5x" in table or "2.50x" in table


def test_static_profile_cache(tmp_path):
    key = source_key("core")
    cache = tmp_path / "profile.json"
    cache.write_text(json.dumps({key: {"rows": [], "note": "from the cache", "key": key, "scope": "core"}}))
    found = static_profile("core", cache=str(cache))
    assert found["cached"] and found["note"] == "from the cache"
    assert source_key("core") != source_key("all")
    assert static_profile("none") is None


def test_runner_end_to_end(tmp_path, monkeypatch):
    """A small CPU run of the runner: JSON, Markdown and plots are written; attn_fast's rows are
    checked against the float64 reference; competitors get speed-ups. (The CPU path here: the
    interpreted kernels are checked by the other tests, and here they would only be slow.)"""
    from bench.__main__ import main

    monkeypatch.setenv("ATTN_FAST_BACKEND", "reference")

    rc = main(["--ops", "se", "--match", "mobilenetv3_large_100 N2 C72 28x28 Cr24 nchw", "--directions", "fwd", "bwd",
               "--profile", "none", "--interpreter", "off", "--out", str(tmp_path), "--tag", "t", "--device", "cpu"])
    assert rc == 0
    (folder,) = list(tmp_path.iterdir())
    names = sorted(p.name for p in folder.iterdir())
    assert any(n.endswith("-t.json") for n in names) and any(n.endswith("-t.md") for n in names)
    run = json.loads(next(folder.glob("*-t.json")).read_text())
    assert run["env"]["device"] == "cpu" and run["roofline"]["copy_bytes_per_s"] > 0
    ours = [r for r in run["rows"] if r["impl"] == "attn_fast"]
    assert {r["direction"] for r in ours} == {"fwd", "bwd"} and all(r["status"] == "ok" for r in ours)
    fwd = next(r for r in ours if r["direction"] == "fwd")
    assert fwd["check"]["fwd_ok"] and fwd["check"]["grad_ok"]
    assert {"reference", "torchvision", "timm"} <= set(fwd["speedup"])
    assert fwd["gbps"] > 0 and fwd["pct_roofline"] > 0
    assert all(r["peak_bytes"] > 0 for r in run["rows"] if r.get("status") == "ok")  # measured on the CPU too
    md = next(folder.glob("*-t.md")).read_text()
    assert "GPU figures need a GPU" in md and "Squeeze-and-excitation" in md
    pytest.importorskip("matplotlib")
    assert any(n.endswith(".png") for n in names)


def test_pytest_benchmark_files_run():
    pytest.importorskip("pytest_benchmark")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "bench/", "--benchmark-only", "-p", "no:cacheprovider",
                          "-k", "efficientnet_b0 and C32 and nchw and fwd and not bwd and attn_fast"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, ATTN_FAST_BENCH_DEVICE="cpu", TRITON_INTERPRET="0"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "1 passed" in res.stdout


def test_cpu_timing_interleaves_and_flags_spread():
    """CPU rows time their implementations call by call in turn (one call of each per round), so a
    load on the machine hits them alike; each round takes a new order, so each one follows each other
    one about equally often; a row whose p80 / p20 passes NOISY_SPREAD is flagged."""
    from bench import measure

    order = []
    slow = iter([1e-3] * 3 + [30e-3] * 100)

    def make(name, wait=None):
        def fn():
            order.append(name)
            if wait is not None:
                time.sleep(next(wait))
        return fn

    timings = measure.time_interleaved({"a": make("a"), "b": make("b", slow)}, {}, min_calls=6, budget_s=0.0)
    rounds = [order[i:i + 2] for i in range(0, len(order), 2)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b"] for r in rounds)
    assert timings["a"].calls == timings["b"].calls == 6
    names = "abc"
    order.clear()
    measure.time_interleaved({n: make(n) for n in names}, {}, min_calls=300, budget_s=0.0)
    follows = {(x, y): 0 for x in names for y in names if x != y}
    for prev, cur in zip(order, order[1:]):
        if prev != cur:
            follows[(prev, cur)] += 1
    assert min(follows.values()) > 0.6 * max(follows.values()), follows  # no fixed successor
    assert timings["b"].noisy and timings["b"].ms_p80 > measure.NOISY_SPREAD * timings["b"].ms_p20


def test_cpu_peak_memory_sees_what_is_alive_at_once():
    from bench import measure

    def fn():
        a = torch.ones(1 << 20)          # 4 MiB, freed before b
        del a
        b = torch.ones(1 << 19)          # 2 MiB
        return (b * 2).sum()             # + 2 MiB alive with b

    peak = measure.peak_memory(fn, torch.device("cpu"))
    assert 4 << 20 <= peak < 5 << 20


def test_model_steps_run_interleaved_on_the_cpu(tmp_path, monkeypatch):
    """The whole-model part on the CPU: a converted MultiheadAttention layer against the original,
    their training steps timed in turn; both rows ok, with memory. (The CPU path: interpreted kernels
    would take minutes at this size.)"""
    from bench.__main__ import main

    monkeypatch.setenv("ATTN_FAST_BACKEND", "cpu")

    rc = main(["--ops", "model", "--match", "multihead_attention", "--profile", "none", "--interpreter", "off",
               "--out", str(tmp_path), "--tag", "m", "--device", "cpu", "--no-plots"])
    assert rc == 0
    run = json.loads(next(tmp_path.glob("*/*-m.json")).read_text())
    rows = {r["impl"]: r for r in run["rows"]}
    assert rows["attn_fast"]["status"] == rows["original"]["status"] == "ok"
    assert rows["attn_fast"]["ms"] > 0 and rows["attn_fast"]["peak_bytes"] > 0
