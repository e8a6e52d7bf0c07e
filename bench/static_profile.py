"""The static profile table of the benchmark report (DESIGN.md sections 2 and 6): every kernel
configuration compiled ahead of time for sm_80 and sm_90 (shared memory, registers, spills, wgmma,
resident warps), so a reader sees what each kernel will do on an A100/H100 before anyone runs it.

Compiling takes about 10 s a configuration on 2 cores, so results are cached in
``bench/results/static_profile.json`` keyed by a hash of the kernel sources and the triton version:
a run reuses them while the kernels are unchanged and recompiles when they change.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from typing import Any, Dict, Optional

import triton

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, "results", "static_profile.json")


def source_key(scope: str) -> str:
    """Hash of kernels/*.py, the triton version and the scope ("core" or "all")."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "kernels", "*.py"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(f"triton {triton.__version__} {scope}".encode())
    return h.hexdigest()[:16]


def static_profile(scope: str = "core", cache: str = CACHE, refresh: bool = False) -> Optional[Dict[str, Any]]:
    """{"rows", "note", "key", "cached"} for ``scope`` "core" (the configurations every ``make test``
    compiles) or "all"; None for "none"."""
    if scope == "none":
        return None
    if scope not in ("core", "all"):
        raise ValueError(f"scope must be core, all or none, got {scope!r}")
    key = source_key(scope)
    entries: Dict[str, Any] = {}
    if os.path.exists(cache):
        with open(cache) as f:
            entries = json.load(f)
    if not refresh and key in entries:
        found = entries[key]
        found["cached"] = True
        return found
    from attn_fast.kernels.aot import profile_in_subprocess

    print(f"== static profile: compiling the {scope} kernel configurations for sm_80 and sm_90 "
          "(about 10 s each on 2 cores; cached afterwards)", file=sys.stderr, flush=True)
    rows = profile_in_subprocess(core_only=scope == "core", cwd=ROOT)
    bad = sum(bool(r["problems"]) for r in rows)
    note = (f"{len(rows)} compiles ({scope} configurations; `python -m bench --profile all` for every one), "
            f"triton {triton.__version__}, ptxas from triton's bundle; {bad} with problems.")
    entry = {"rows": rows, "note": note, "key": key, "scope": scope, "triton": triton.__version__}
    # keep one entry per scope: a stale one would only grow the file
    entries = {k: v for k, v in entries.items() if v.get("scope") != scope}
    entries[key] = entry
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w") as f:
        json.dump(entries, f, indent=0)
    return dict(entry, cached=False)
