"""Command line: ``python -m attn_fast info`` (or ``attn-fast info``)."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional

import torch

from . import __version__
from .dispatch import ENV_VAR, OPS, get_backend, interpreter_enabled, route


def _triton_version() -> str:
    try:
        import triton
    except ImportError as exc:  # pragma: no cover - triton is a dependency
        return f"not importable ({exc})"
    return triton.__version__


def info_lines() -> List[str]:
    """What runs where and why, as printed by ``python -m attn_fast info``."""
    lines = [
        f"attn_fast {__version__}",
        f"python    {platform.python_version()} ({sys.executable})",
        f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton    {_triton_version()}",
        f"Triton interpreter: {'on' if interpreter_enabled() else 'off'} (TRITON_INTERPRET)",
        f"backend: {get_backend()} (set_backend() or {ENV_VAR})",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}    {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
            devices.append(torch.device("cuda", i))
    else:
        lines.append("cuda      no CUDA device: GPU kernels need one (or the interpreter)")
    lines.append("")
    lines.append("op                             device  dtype     path       why")
    for op in OPS:
        for device in devices:
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                try:
                    r = route(op, device, dtype, warn=False)
                    path, why = r.path, r.reason
                except RuntimeError as exc:
                    path, why = "error", str(exc)
                name = str(dtype).replace("torch.", "")
                lines.append(f"{op:<30} {str(device):<7} {name:<9} {path:<10} {why}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attn_fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, interpreter mode and the path each op takes")
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
