"""Ahead-of-time compile of every kernel configuration for sm_80 and sm_90 (DESIGN.md section 2):
each must compile for both and fit their shared-memory limits; on each cap whose launchers may pick
it (``AOTCase.targets``: the launchers keep one candidate table per target, sm_90 and sm_80) it must
spill no registers and, on sm_90, use wgmma where its dots can (16-bit, 64+ rows). No GPU needed;
the compile runs in a child process with the interpreter off (kernels/aot.py).
"""
import os

import pytest

from attn_fast.kernels import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPS = (80, 90)


def _run_slow(config) -> bool:
    return config.getoption("--runslow") or os.environ.get("ATTN_FAST_SLOW") == "1"


@pytest.fixture(scope="module")
def kernel_profiles(request):
    """Static profiles of the library's AOT_CASES: the core ones, or all of them with --runslow."""
    return aot.profile_in_subprocess(caps=CAPS, cwd=ROOT, core_only=not _run_slow(request.config))


@pytest.fixture(scope="module")
def probe_profiles():
    """Static profiles of tests/aot_probe.py: kernels with known properties that check the harness."""
    rows = aot.profile_in_subprocess(["tests.aot_probe"], caps=CAPS, cwd=ROOT)
    return {(r["name"], r["cap"]): r for r in rows}


def _library_case_ids():
    """(kernel config, cap) ids, collected here without compiling anything; non-core ones are slow."""
    try:
        cases = aot.collect_cases()
    except Exception as exc:  # an import error shows as a failing test below, not a collection crash
        return [f"collect-error:{exc}"]
    return [pytest.param(f"{c.name}@sm_{cap}", marks=() if c.core else pytest.mark.slow)
            for c in cases for cap in CAPS]


@pytest.mark.parametrize("case_id", _library_case_ids())
def test_kernel_config_compiles_and_fits(case_id, kernel_profiles):
    assert not case_id.startswith("collect-error"), case_id
    name, cap = case_id.rsplit("@sm_", 1)
    (row,) = [r for r in kernel_profiles if r["name"] == name and r["cap"] == int(cap)]
    assert not row["problems"], f"{case_id}: {row['problems']}"


def test_every_kernel_module_lists_its_configs():
    """Each module named in KERNEL_MODULES has AOT_CASES with unique names."""
    from attn_fast import kernels

    cases = aot.collect_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "duplicate AOT case names"
    for mod in kernels.KERNEL_MODULES:
        assert any(getattr(c.fn, "fn", c.fn).__module__.endswith(mod) for c in cases), f"{mod} has no AOT_CASES"


def test_harness_sees_wgmma_in_a_hopper_matmul(probe_profiles):
    sm90 = probe_profiles[("probe_matmul[128x128x64,w8,s3]", 90)]
    sm80 = probe_profiles[("probe_matmul[128x128x64,w8,s3]", 80)]
    assert sm90["wgmma"] and not sm80["wgmma"]
    assert sm90["problems"] == [] and sm80["problems"] == []
    assert 0 < sm90["shared"] <= aot.SHARED_LIMIT[90]
    assert 0 < sm90["registers"] <= 255 and sm90["blocks_per_sm"] >= 1


def test_harness_counts_sass_per_mma_loop(probe_profiles):
    """The profile's SASS/loop: one innermost tensor-core loop in the probe matmul on both caps (its
    K loop), none in a kernel without a dot."""
    for cap in CAPS:
        loops = probe_profiles[("probe_matmul[128x128x64,w8,s3]", cap)]["sass_per_loop"]
        assert len(loops) == 1 and 50 < loops[0] < 5000, loops
        assert probe_profiles[("probe_copy[1024,w4]", cap)]["sass_per_loop"] == []


def test_harness_reports_registers_and_occupancy(probe_profiles):
    for cap in CAPS:
        row = probe_profiles[("probe_copy[1024,w4]", cap)]
        assert not row["wgmma"] and row["problems"] == []
        assert 0 < row["registers"] < 64
        assert row["warps_per_sm"] == row["blocks_per_sm"] * 4 > 0


def test_harness_flags_a_missing_wgmma(probe_profiles):
    row = probe_profiles[("probe_copy[1024,w4,claims-dot]", 90)]
    assert any("wgmma" in p for p in row["problems"])
    assert probe_profiles[("probe_copy[1024,w4,claims-dot]", 80)]["problems"] == []


def test_problems_flag_shared_memory_and_spills():
    over = aot.StaticProfile("x", 90, 4, 2, shared=aot.SHARED_LIMIT[90] + 1, shared_limit=aot.SHARED_LIMIT[90])
    assert any("shared memory" in p for p in over.problems())
    spill = aot.StaticProfile("x", 80, 4, 2, shared=1024, shared_limit=aot.SHARED_LIMIT[80], spill_stores=8)
    assert any("spills" in p for p in spill.problems())
    broken = aot.StaticProfile("x", 80, 4, 2, error="CompilationError: boom")
    assert broken.problems() == ["compile failed: CompilationError: boom"]


def test_caps_a_config_is_not_picked_on_only_need_compile_and_fit():
    spill = aot.StaticProfile("x", 80, 4, 2, shared=1024, shared_limit=aot.SHARED_LIMIT[80], spill_stores=8,
                              targeted=False)
    assert spill.problems() == []
    over = aot.StaticProfile("x", 80, 4, 2, shared=aot.SHARED_LIMIT[80] + 1, shared_limit=aot.SHARED_LIMIT[80],
                             targeted=False)
    assert any("shared memory" in p for p in over.problems())


def _first_case(prefix: str) -> str:
    return next(c.name for c in aot.collect_cases() if c.name.startswith(prefix) and c.core)


def test_the_gate_compiles_what_the_jit_compiles():
    """The gate records a config's launch from the launcher's real call (triton's own binder, through
    its jit_cache_hook) and compiles that; the JIT, handed the same launch in warm-up mode, compiles
    the same PTX (so the same registers and spills), aligned and unaligned, forward and backward.
    The launch specialises what a hand-written all-i32 signature did not: unit strides as constexprs,
    16-divisible ints and pointers as tt.divisibility=16."""
    import json
    import subprocess
    import sys

    names = [_first_case("attn_fwd[bf16,E128,"), _first_case("attn_fwd[bf16,E72,L1000,"),
             _first_case("attn_bwd_dq[fp16,E128,"), _first_case("attn_bwd_dkdv[fp16,E72,L1000,")]
    cmd = [sys.executable, "-m", "attn_fast.kernels.aot", "--cap", "90"]
    for name in names:
        cmd += ["--jit-check", name]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200,
                         env=dict(os.environ, TRITON_INTERPRET="0"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in rows] == names
    for r in rows:
        assert r["same_ptx"], r["name"]
        assert r["gate"] == r["jit"] and r["gate"]["registers"] > 0, r
        sig = r["launch"]["signature"]
        assert sig["stride_qk"] == "constexpr" if "stride_qk" in sig else True, r["name"]
    aligned, unaligned = rows[0]["launch"], rows[1]["launch"]
    assert aligned["signature"]["stride_qm"] == "i32" and unaligned["signature"]["stride_qm"] == "i32"
    position = list(aligned["signature"]).index("stride_qm")
    assert f"({position},)" in aligned["divisible"]          # 128 elements: divisible by 16
    assert f"({position},)" not in unaligned["divisible"]    # 72 elements: not
