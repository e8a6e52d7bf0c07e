"""Ahead-of-time compilation of the kernels for sm_80 and sm_90 without a GPU, and the static profile
it yields (DESIGN.md section 2): shared memory against the device limit, registers and spills from
ptxas, and whether Hopper's warpgroup MMA (wgmma) is used.

Each kernel module lists the configurations its launcher or autotuner may pick as ``AOT_CASES``
(a list of :class:`AOTCase`) and is named in ``attn_fast.kernels.KERNEL_MODULES``.

The gate must compile what a launch compiles: a launch specialises its arguments (ints equal to 1
become constexprs; 16-divisible ints and 16-byte-aligned pointers get ``tt.divisibility=16``), and
a hand-written all-i32 signature compiles another kernel (for the attention forward at E=128, 218
registers and scalar loads against the launch's ~100 and 16-byte ``cp.async``; spills that no launch
has). So the attention cases are launcher calls: :func:`record_launch` runs the real launcher on
meta tensors of a representative shape (an aligned and an unaligned one), as on an sm_80/sm_90 GPU
(a compile-only stand-in for triton's driver), its tuning forced to the case's config
(``tuning.forced``), and takes the launch's specialisation from triton's own binder through the
JIT's ``jit_cache_hook``. :func:`check_against_jit` proves it: the JIT's own compile of the same
launch gives the same PTX (``tests/test_compile.py``). The SE and CBAM kernels still give a
hand-written signature, with their unit strides marked (``unit_strides``).

Compiling needs real ``@triton.jit`` functions, which Triton's interpreter replaces, so the compile
runs in a child process with the interpreter off::

    python -m attn_fast.kernels.aot [--module MOD ...] [--cap 80 90] [--json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["AOTCase", "Launch", "StaticProfile", "SHARED_LIMIT", "compile_case", "collect_cases", "jit_compile",
           "profile_in_subprocess", "record_launch", "signature_of"]

#: Largest dynamic shared memory one block may use, bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 90: 232448}
#: Shared memory per SM (bytes), registers per SM, and resident threads per SM.
SHARED_PER_SM = {80: 167936, 90: 233472}
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32


def signature_of(fn: Any, pointers: Dict[str, str], floats: Sequence[str] = ()) -> Dict[str, str]:
    """The Triton signature of kernel ``fn``'s runtime arguments: ``pointers`` maps pointer arguments
    to their types ("*fp16"...), ``floats`` are fp32 scalars, every other non-constexpr argument is
    an i32 (sizes, strides). Works on jitted and interpreted kernels alike."""
    import inspect

    import triton.language as tl

    params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
    sig = {}
    for p in params:
        if p.annotation is tl.constexpr or p.annotation == "tl.constexpr":
            continue
        sig[p.name] = pointers.get(p.name) or ("fp32" if p.name in floats else "i32")
    unknown = (set(pointers) | set(floats)) - set(sig)
    if unknown:
        raise ValueError(f"{getattr(fn, '__name__', fn)} has no runtime arguments {sorted(unknown)}")
    return sig


def unit_strides(signature: Dict[str, str], constexprs: Dict[str, Any], names: Sequence[str]) -> None:
    """Mark the stride arguments in ``names`` that ``signature`` has as constexpr 1, as a launch with
    unit strides specialises them (in place)."""
    for name in names:
        if name in signature:
            signature[name] = "constexpr"
            constexprs[name] = 1


@dataclass(frozen=True)
class AOTCase:
    """One compile configuration of one kernel.

    Either ``launch``: a call of the kernel's real launcher (on meta tensors of a representative
    shape, its tuning forced to this case's config, see :func:`record_launch`), whose launch of ``fn``
    is compiled exactly as the JIT would specialise it; or, for test probes, a hand-written
    ``signature`` (every non-constexpr argument to its Triton type, "*fp16", "i32", "fp32"...) and
    ``constexprs`` (the value of every constexpr argument). ``uses_dot``: the inner loop is a
    ``tl.dot``, so on sm_90 wgmma is expected (unless ``expect_wgmma=False`` says why not).
    """

    name: str
    fn: Any
    signature: Dict[str, str] = field(default_factory=dict)
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    uses_dot: bool = False
    expect_wgmma: Optional[bool] = None
    #: compiled by every ``make test``; the rest only with --runslow (the full matrix takes ~10 s a
    #: compile on 2 cores). A kernel marks at least its heaviest variant of every tile config core.
    core: bool = True
    #: the compute capabilities whose launchers may pick this config. It is compiled for every cap
    #: and must fit each; spills and a missing wgmma count only on these.
    targets: Tuple[int, ...] = (80, 90)
    #: spill bytes (stores or loads) tolerated on the targets: 0, except for a table entry where no candidate
    #: compiled spill-free; such entries say so where they are defined (a known cost, kept visible).
    spill_budget: int = 0
    #: the launcher call whose launch of ``fn`` is compiled (see the class docstring); it runs with
    #: triton's driver and torch.cuda's capability answering as a GPU of ``targets[0]``, so the
    #: launcher picks that cap's tile table
    launch: Optional[Any] = None

    @property
    def wants_wgmma(self) -> bool:
        return self.uses_dot if self.expect_wgmma is None else self.expect_wgmma


@dataclass
class StaticProfile:
    """What a kernel config will do on an SM of compute capability ``cap``."""

    name: str
    cap: int
    num_warps: int
    num_stages: int
    shared: int = 0
    shared_limit: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    wgmma: bool = False
    #: the warpgroup MMA shapes in the sm_90 PTX, e.g. "m64n64k16" (N < 64 feeds the tensor cores
    #: poorly)
    wgmma_shapes: List[str] = field(default_factory=list)
    #: SASS instructions per iteration of each innermost loop that holds tensor-core MMAs (HGMMA on
    #: sm_90, HMMA on sm_80), from cuobjdump: the non-MMA work a main-loop iteration issues
    sass_per_loop: List[int] = field(default_factory=list)
    wants_wgmma: bool = False
    #: a launcher may pick this config on this cap (else it only has to compile and fit)
    targeted: bool = True
    spill_budget: int = 0
    error: str = ""
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.error and self.shared <= self.shared_limit

    def problems(self) -> List[str]:
        """Why this config must not be used (empty if it is fine)."""
        out = []
        if self.error:
            out.append(f"compile failed: {self.error}")
            return out
        if self.shared > self.shared_limit:
            out.append(f"shared memory {self.shared} B > sm_{self.cap} limit {self.shared_limit} B")
        if not self.targeted:
            return out
        if max(self.spill_stores, self.spill_loads) > self.spill_budget:
            out.append(f"spills: {self.spill_stores} B stores, {self.spill_loads} B loads")
        if self.cap >= 90 and self.wants_wgmma and not self.wgmma:
            out.append("inner tl.dot does not use wgmma on sm_90")
        return out


def _ptxas_path(cap: int) -> str:
    from triton.backends.nvidia import compiler as nv

    try:
        tool = nv.get_ptxas(cap)
    except TypeError:  # older triton: get_ptxas() takes no argument
        tool = nv.get_ptxas()
    path = getattr(tool, "path", tool)
    if isinstance(path, str) and os.path.exists(path):
        return path
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_usage(ptx: str, cap: int) -> Dict[str, int]:
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas_path(cap), f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[-500:]}")

    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
    }


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")


def _sass_loops(cubin: bytes, cap: int) -> List[int]:
    """Instruction counts of the innermost loops (a backward branch to an earlier address, no EXIT
    inside) that hold an HGMMA or HMMA, from ``cuobjdump -sass`` of ``cubin``; [] without the tool."""
    tool = os.path.join(os.path.dirname(_ptxas_path(cap)), "cuobjdump")
    if not os.path.exists(tool):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in map(_SASS_LINE.search, res.stdout.splitlines()) if m]
    index = {address: i for i, (address, _) in enumerate(code)}
    loops = []
    for i, (address, text) in enumerate(code):
        target = re.search(r"\bBRA\s+(?:`?\()?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
            body = code[index[int(target.group(1), 16)]:i + 1]
            ops = [t.split()[1] if t.startswith("@") else t.split()[0] for _, t in body]
            if any(op.startswith(("HGMMA", "HMMA")) for op in ops) and "EXIT" not in ops:
                loops.append((index[int(target.group(1), 16)], i))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [b - a + 1 for a, b in innermost]


def _occupancy(p: StaticProfile) -> None:
    threads = 32 * p.num_warps
    limits = [THREADS_PER_SM // threads, MAX_BLOCKS_PER_SM]
    if p.registers:
        regs_per_warp = -(-p.registers * 32 // 256) * 256  # allocated per warp in units of 256
        limits.append(REGISTERS_PER_SM // (regs_per_warp * p.num_warps))
    if p.shared:
        limits.append(SHARED_PER_SM[p.cap] // (p.shared + 1024))  # 1 KiB reserved per block
    p.blocks_per_sm = max(0, min(limits))
    p.warps_per_sm = p.blocks_per_sm * p.num_warps


@dataclass
class Launch:
    """One kernel launch as the JIT compiles it: the specialised signature (unit ints as constexprs),
    the constexpr values, the alignment attributes (``tt.divisibility``) and the options."""

    fn: Any
    signature: Dict[Any, str]
    constexprs: Dict[Any, Any]
    attrs: Dict[Any, Any]
    num_warps: int
    num_stages: int
    #: the launch's own arguments (positional, keyword), as the launcher passed them
    call_args: Tuple[tuple, Dict[str, Any]] = ((), {})


class _CompileOnlyDriver:
    """A stand-in for triton's active driver that answers as a CUDA device of compute capability
    ``cap`` (device and stream ids only): enough for the JIT to bind, specialise and compile a launch
    without a GPU. Loading or running the result needs a real driver and fails."""

    def __init__(self, cap: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.cap = cap
        self.target = GPUTarget("cuda", cap, 32)

    def get_current_device(self) -> int:
        return self.cap  # one JIT cache per cap

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self) -> bool:
        return True


class _AsGPU:
    """The launcher-facing environment of a GPU of compute capability ``cap``, without one: triton's
    active driver (:class:`_CompileOnlyDriver`) and ``torch.cuda.get_device_capability``, which the
    launchers read to pick their cap's tile table."""

    def __init__(self, cap: int) -> None:
        self.cap = cap

    def __enter__(self):
        import torch
        from triton.runtime.driver import driver

        self._driver, self._torch_cap = driver, torch.cuda.get_device_capability
        self._previous = driver._active
        driver.set_active(_CompileOnlyDriver(self.cap))
        torch.cuda.get_device_capability = lambda device=None: (self.cap // 10, self.cap % 10)
        return self

    def __exit__(self, *exc) -> None:
        import torch

        self._driver._active = self._previous
        torch.cuda.get_device_capability = self._torch_cap


def record_launch(call: Any, fn: Any, cap: int) -> Launch:
    """Run ``call()`` (a launcher on meta tensors) as on an sm_<cap> GPU and return its launch of
    kernel ``fn`` as the JIT specialises it, taken from triton's own binder through its
    ``jit_cache_hook`` (called with the specialisation just before the JIT would compile; returning
    True skips the compile and the launch). Launches of other kernels are ignored; ``fn`` must be
    launched exactly once, or with one specialisation."""
    from triton import knobs

    seen: List[Launch] = []
    raw: List[Tuple[tuple, Dict[str, Any]]] = []

    def hook(*, fn: Any, compile: Dict[str, Any], **_) -> bool:
        jit = getattr(fn, "jit_function", fn)
        seen.append(Launch(jit, dict(compile["signature"]), dict(compile["constants"]), dict(compile["configs"][0]),
                           compile["num_warps"], compile["num_stages"], raw[-1] if jit is target else ((), {})))
        return True

    def keep_arguments(*args, **kwargs) -> None:
        raw.append((args, dict(kwargs)))

    target = fn
    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    fn.pre_run_hooks.append(keep_arguments)
    try:
        with _AsGPU(cap):
            _clear_jit_cache(fn, cap)
            call()
    finally:
        knobs.runtime.jit_cache_hook = previous
        fn.pre_run_hooks.remove(keep_arguments)
    mine = [launch for launch in seen if launch.fn is fn]
    keys = {repr((sorted(map(repr, x.signature.items())), sorted(map(repr, x.constexprs.items())),
                  sorted(map(repr, x.attrs.items())), x.num_warps, x.num_stages)) for x in mine}
    if len(keys) != 1:
        raise RuntimeError(f"the launcher call launched {getattr(fn, '__name__', fn)} {len(mine)} times with "
                           f"{len(keys)} specialisations; expected one")
    return mine[0]


def _clear_jit_cache(fn: Any, cap: int) -> None:
    """Forget the JIT's compiled kernels for the stand-in device ``cap`` (so the hook sees the launch)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None and cap in caches:
        del caches[cap]


def jit_compile(case: AOTCase, cap: int, launch: Optional[Launch] = None) -> Any:
    """The CompiledKernel the JIT itself makes, as on an sm_<cap> GPU, for ``case``'s launch of
    ``case.fn``: the launcher's own arguments (``launch``, else recorded by :func:`record_launch`)
    handed to ``JITFunction.run`` in warm-up mode, which binds, specialises and compiles but launches
    nothing. The test of the gate compares this with the gate's compile."""
    args, kwargs = (launch or record_launch(case.launch, case.fn, case.targets[0])).call_args
    with _AsGPU(cap):
        _clear_jit_cache(case.fn, cap)
        return case.fn.run(*args, grid=(1,), warmup=True, **kwargs)


def _gate_compile(case: AOTCase, cap: int) -> Tuple[Any, Optional[Launch]]:
    """(the CompiledKernel the gate makes of ``case`` for sm_<cap>, the recorded launch or None for a
    hand-written signature)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch = None
    if case.launch is not None:
        launch = record_launch(case.launch, case.fn, case.targets[0])
        if (launch.num_warps, launch.num_stages) != (case.num_warps, case.num_stages):
            raise RuntimeError(f"the launcher launched {launch.num_warps} warps, {launch.num_stages} stages; "
                               f"the case says {case.num_warps}, {case.num_stages}")
        src = ASTSource(fn=case.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
    else:
        signature = dict(case.signature)
        for name in case.constexprs:
            signature.setdefault(name, "constexpr")
        src = ASTSource(fn=case.fn, signature=signature, constexprs=dict(case.constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    return compiled, launch


def compile_case(case: AOTCase, cap: int) -> StaticProfile:
    """Compile ``case`` for sm_<cap> and measure it. Needs the interpreter off."""
    prof = StaticProfile(case.name, cap, case.num_warps, case.num_stages, shared_limit=SHARED_LIMIT[cap],
                         wants_wgmma=case.wants_wgmma, targeted=cap in case.targets,
                         spill_budget=case.spill_budget)
    try:
        compiled, _ = _gate_compile(case, cap)
        ptx = compiled.asm["ptx"]
        prof.shared = int(compiled.metadata.shared)
        prof.wgmma = "wgmma.mma_async" in ptx
        prof.wgmma_shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)),
                                   key=lambda m: [int(x) for x in re.findall(r"\d+", m)])
        usage = _ptxas_usage(ptx, cap)
        prof.sass_per_loop = _sass_loops(compiled.asm["cubin"], cap) if case.uses_dot else []
    except Exception as exc:  # reported as a problem of this config, not a crash of the whole run
        prof.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return prof
    prof.registers = usage["registers"]
    prof.spill_stores = usage["spill_stores"]
    prof.spill_loads = usage["spill_loads"]
    _occupancy(prof)
    return prof


def check_against_jit(case: AOTCase, cap: int) -> Dict[str, Any]:
    """The gate's compile of ``case`` beside the JIT's own compile of the same launcher call
    (:func:`jit_compile`): their registers, spills and whether the PTX is the same text."""
    gate, launch = _gate_compile(case, cap)
    jit = jit_compile(case, cap, launch)
    return {"name": case.name, "cap": cap, "gate": _ptxas_usage(gate.asm["ptx"], cap),
            "jit": _ptxas_usage(jit.asm["ptx"], cap), "same_ptx": gate.asm["ptx"] == jit.asm["ptx"],
            "launch": {"signature": {str(k): v for k, v in launch.signature.items()},
                       "constexprs": {str(k): repr(v) for k, v in launch.constexprs.items()},
                       "divisible": sorted(str(k) for k, v in launch.attrs.items() if v)}}


def collect_cases(modules: Optional[Sequence[str]] = None, core_only: bool = False) -> List[AOTCase]:
    """Every ``AOT_CASES`` entry of the given modules (default: all of ``KERNEL_MODULES``); only the
    core ones with ``core_only``."""
    if modules is None:
        from . import KERNEL_MODULES

        modules = [f"{__package__}.{m}" for m in KERNEL_MODULES]
    cases: List[AOTCase] = []
    for mod in modules:
        cases.extend(importlib.import_module(mod).AOT_CASES)
    return [c for c in cases if c.core or not core_only]


def profile_in_subprocess(modules: Optional[Sequence[str]] = None, caps: Sequence[int] = (80, 90),
                          cwd: Optional[str] = None, timeout: float = 3600,
                          core_only: bool = False) -> List[Dict[str, Any]]:
    """Run the AOT compile in a child process with the interpreter off; returns one dict per
    (case, cap), the fields of :class:`StaticProfile` plus ``problems``."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    cmd = [sys.executable, "-m", f"{__package__}.aot", "--json", "--cap", *map(str, caps)]
    for mod in modules or ():
        cmd += ["--module", mod]
    if core_only:
        cmd.append("--core")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"AOT compile run failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of static profiles (kernel, config, shared, registers, spills, wgmma, occupancy)."""
    head = ("| kernel config | sm | warps | stages | shared B | regs/thread | spills B | wgmma | SASS/loop | "
            "blocks/SM | warps/SM | problems |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        wg = ("yes " + " ".join(r.get("wgmma_shapes", ()))).strip() if r["wgmma"] else (
            "no (wanted)" if r["wants_wgmma"] and r["cap"] >= 90 else "no")
        lines.append(
            f"| {r['name']} | {r['cap']} | {r['num_warps']} | {r['num_stages']} | {r['shared']} | "
            f"{r['registers']} | {r['spill_stores'] + r['spill_loads']} | {wg} | "
            f"{' '.join(map(str, r.get('sass_per_loop', ()))) or '-'} | {r['blocks_per_sm']} | "
            f"{r['warps_per_sm']} | {'; '.join(r['problems']) or ('-' if r.get('targeted', True) else 'not picked here')} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="AOT-compile the kernels for sm_80/sm_90 and profile them")
    parser.add_argument("--module", action="append", help="module with AOT_CASES (default: all kernels)")
    parser.add_argument("--cap", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.add_argument("--core", action="store_true", help="only the cases marked core")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--jit-check", action="append", default=[], metavar="CASE",
                        help="compare the gate's compile of this case with the JIT's own (JSON lines)")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"
    if args.jit_check:
        by_name = {c.name: c for c in collect_cases(args.module)}
        for name in args.jit_check:
            for cap in args.cap:
                print(json.dumps(check_against_jit(by_name[name], cap)))
        return 0
    jobs = [(i, cap) for i in range(len(collect_cases(args.module, args.core))) for cap in args.cap]
    rows: List[Dict[str, Any]] = []
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs) as pool:
            for n, row in enumerate(pool.map(_compile_job, [(args.module, args.core, i, cap) for i, cap in jobs])):
                rows.append(row)
                _progress(n + 1, len(jobs), row)
    else:
        for n, (i, cap) in enumerate(jobs):
            rows.append(_compile_job((args.module, args.core, i, cap)))
            _progress(n + 1, len(jobs), rows[-1])
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


def _compile_job(job) -> Dict[str, Any]:
    modules, core_only, index, cap = job
    prof = compile_case(collect_cases(modules, core_only)[index], cap)
    row = asdict(prof)
    row["problems"] = prof.problems()
    return row


def _progress(done: int, total: int, row: Dict[str, Any]) -> None:
    print(f"[{done}/{total}] {row['name']} sm_{row['cap']}: {'; '.join(row['problems']) or 'ok'}",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
