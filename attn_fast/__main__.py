"""Command line (``python -m attn_fast`` or ``attn-fast``):

    info                      versions, devices, interpreter mode and the path each op takes
    verify MODEL [options]    convert a timm model (random weights) and verify it against the original
"""
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


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def verify_model(name: str, *, block_attn: Optional[str] = None, batch: int = 2, size: int = 64,
                 dtype: str = "fp32", device: str = "cpu", train: bool = False, seed: int = 0):
    """Build timm model ``name`` (random weights; ``block_attn`` sets the attention layer of ResNet-style
    blocks, e.g. "cbam", "se", "eca"), convert a copy, and verify it on random inputs."""
    import copy

    try:
        import timm
    except ImportError:
        raise SystemExit("attn_fast verify needs timm (pip install timm)") from None
    from .convert import convert
    from .verify import randomize_zero_init, verify

    torch.manual_seed(seed)
    kwargs = {"block_args": {"attn_layer": block_attn}} if block_attn else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise SystemExit(f"attn_fast verify: timm cannot build {name!r}{' with ' + str(kwargs) if kwargs else ''}: {exc}")
    model = randomize_zero_init(model, seed).to(device).train(train)
    original = copy.deepcopy(model)
    converted, conv_report = convert(model, report=True)
    in_chans = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
    x = torch.randn(batch, in_chans, size, size, device=device)
    return conv_report, verify(original, converted, x, dtype=_DTYPES[dtype])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attn_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, interpreter mode and the path each op takes")
    v = sub.add_parser("verify", help="convert a timm model and check it against the float64 original")
    v.add_argument("model", help="a timm model name, e.g. seresnet50, efficientnet_b0, mobilenetv3_large_100, "
                                 "resnet50 (with --block-attn cbam)")
    v.add_argument("--block-attn", default=None, help="attention layer of the blocks (timm attn_layer: cbam, se, eca...)")
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--size", type=int, default=64, help="input height and width")
    v.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    v.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    v.add_argument("--train", action="store_true", help="training mode (BatchNorm batch statistics)")
    v.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    conv_report, report = verify_model(args.model, block_attn=args.block_attn, batch=args.batch, size=args.size,
                                       dtype=args.dtype, device=args.device, train=args.train, seed=args.seed)
    print(conv_report)
    print(report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
