"""Command line (``python -m attn_fast`` or ``attn-fast``):

    info                      versions, devices, interpreter mode and the path each op takes
    verify MODEL [options]    convert a timm model (random weights) and verify it against the original
                              (exit status 0 PASS, 1 FAIL, 2 bad arguments, 3 nothing verified)
"""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional

import torch

from . import __version__
from ._validate import InputError
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

#: timm's attn_layer names (timm.layers.get_attn); the ones this timm knows are offered.
_BLOCK_ATTN = ("se", "ese", "eca", "ecam", "ceca", "ge", "gc", "gca", "cbam", "lcbam", "coord", "scoord", "ela",
               "strip", "sk", "splat", "lambda", "bottleneck", "halo", "nl", "bat")


class OptionError(InputError):
    """A bad argument of ``verify_model``; ``option`` is the command line's name for it (``--size``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _device(text: str) -> str:
    """``text`` as a device this machine has (cpu, cuda, cuda:N), else ArgumentTypeError."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: attn_fast verify runs on cpu or cuda devices")
    return str(device)


def _block_attn_names(get_attn) -> List[str]:
    names = []
    for name in _BLOCK_ATTN:
        try:
            get_attn(name)
        except Exception:  # noqa: BLE001 - a name this timm does not know
            continue
        names.append(name)
    return names


def input_size(model: torch.nn.Module) -> Optional[tuple]:
    """The model's own input size (C, H, W): timm models carry it in ``pretrained_cfg`` (older timm:
    ``default_cfg``) as ``input_size``."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if size and len(size) == 3:
            return tuple(int(v) for v in size)
    return None


def verify_model(name: str, *, block_attn: Optional[str] = None, batch: int = 2, size: Optional[int] = None,
                 dtype: str = "fp32", device: str = "cpu", train: bool = False, seed: int = 0):
    """Build timm model ``name`` (random weights; ``block_attn`` sets the attention layer of ResNet-style
    blocks, e.g. "cbam", "se", "eca"), convert a copy, and verify it on random inputs of ``batch`` x the
    model's own input size (``size``: height and width instead).

    Returns ``(conversion report, verify report)``; the verify report is None where convert swapped
    nothing (there is nothing to verify). Bad arguments raise :class:`OptionError` (an
    ``attn_fast.InputError``) naming the argument, also where the model cannot run on the inputs."""
    import copy

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not count(batch):
        raise OptionError("--batch", f"verify_model: batch must be an int >= 1, got {batch!r}")
    if size is not None and not count(size):
        raise OptionError("--size", f"verify_model: size must be an int >= 1 or None, got {size!r}")
    if dtype not in _DTYPES:
        raise OptionError("--dtype", f"verify_model: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    try:
        device = _device(str(device))
    except argparse.ArgumentTypeError as exc:
        raise OptionError("--device", f"verify_model: device {exc}") from None
    try:
        import timm
        from timm.layers import get_attn
    except ImportError:
        raise SystemExit("attn_fast verify needs timm (pip install timm)") from None
    from .convert import convert
    from .verify import randomize_zero_init, verify

    if block_attn is not None:
        names = _block_attn_names(get_attn)
        if not isinstance(block_attn, str) or block_attn.lower() not in names:
            raise OptionError("--block-attn", f"verify_model: block_attn must be one of timm's attn_layer names "
                                              f"({', '.join(names)}), got {block_attn!r}")
    torch.manual_seed(seed)
    kwargs = {"block_args": {"attn_layer": block_attn}} if block_attn else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError, KeyError) as exc:
        if kwargs and not isinstance(exc, RuntimeError):
            raise OptionError("--block-attn", f"timm cannot build {name!r} with block_args={kwargs['block_args']} "
                                              f"({type(exc).__name__}: {exc}): --block-attn takes ResNet-style models "
                                              "(resnet18, resnet50, ...)") from exc
        raise OptionError("model", f"timm cannot build {name!r}{' with ' + str(kwargs) if kwargs else ''}: "
                                   f"{exc}") from exc
    own = input_size(model)
    if own is None and size is None:
        raise OptionError("--size", f"timm model {name!r} carries no input size (pretrained_cfg 'input_size'): "
                                    "give --size")
    in_chans = own[0] if own else 3
    height, width = (size, size) if size is not None else own[1:]
    model = randomize_zero_init(model, seed).to(device).train(train)
    x = torch.randn(batch, in_chans, height, width, device=device)
    try:  # on a copy: a training-mode forward would move the BatchNorm statistics
        with torch.no_grad():
            copy.deepcopy(model)(x)
    except (RuntimeError, ValueError, AssertionError, TypeError, IndexError) as exc:
        own_text = f"; its own input size is {own[1]}x{own[2]}" if own else ""
        option = "--size" if own is None or (height, width) != own[1:] else "--batch"
        raise OptionError(option, f"timm model {name!r} cannot run on inputs of shape {tuple(x.shape)} "
                                  f"(--batch {batch}, {height}x{width}{' in training mode' if train else ''}): "
                                  f"{type(exc).__name__}: {str(exc).rstrip('.')}{own_text}") from exc
    original = copy.deepcopy(model)
    converted, conv_report = convert(model, report=True)
    if not conv_report.swapped:
        return conv_report, None
    return conv_report, verify(original, converted, x, dtype=_DTYPES[dtype])


_EPILOG = """exit status: 0 PASS, 1 FAIL, 2 bad arguments, 3 nothing verified (convert swapped no layer)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attn_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, interpreter mode and the path each op takes")
    v = sub.add_parser("verify", help="convert a timm model and check it against the float64 original",
                       description="Build a timm model with random weights, convert a copy with attn_fast.convert "
                                   "and check it against the original with attn_fast.verify.", epilog=_EPILOG)
    v.add_argument("model", help="a timm model name, e.g. seresnet50, efficientnet_b0, mobilenetv3_large_100, "
                                 "resnet50 (with --block-attn cbam)")
    v.add_argument("--block-attn", default=None, metavar="NAME",
                   help="attention layer of ResNet-style blocks (timm's attn_layer: se, eca, cbam, ...)")
    v.add_argument("--batch", type=_positive_int, default=2, help="batch size of the random input (default: 2)")
    v.add_argument("--size", type=_positive_int, default=None,
                   help="input height and width (default: the model's own input size, from its timm "
                        "pretrained_cfg 'input_size', e.g. 224)")
    v.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32",
                   help="dtype of the converted model and of the same-dtype original (default: fp32)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    v.add_argument("--device", type=_device, default=default_device,
                   help=f"device to run on: cpu, cuda or cuda:N (default: {default_device})")
    v.add_argument("--train", action="store_true",
                   help="training mode (BatchNorm batch statistics and running-statistics updates)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    verify_parser = parser._subparsers._group_actions[0].choices["verify"]
    try:
        conv_report, report = verify_model(args.model, block_attn=args.block_attn, batch=args.batch, size=args.size,
                                           dtype=args.dtype, device=args.device, train=args.train, seed=args.seed)
    except OptionError as exc:
        verify_parser.error(f"argument {exc.option}: {str(exc).removeprefix('verify_model: ')}")
    print(conv_report)
    if report is None:
        print(f"attn_fast verify: nothing verified: convert swapped no layer of {args.model} (see above)"
              + ("" if args.block_attn else "; a ResNet-style model takes --block-attn se, eca or cbam"),
              file=sys.stderr)
        return 3
    print(report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
