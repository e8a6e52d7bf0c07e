"""What the benchmark measures: the shapes of every op (DESIGN.md section 6, issue 7), their work (FLOPs or
bytes) and how to draw their inputs.

A :class:`Case` is one problem size of one *family*:

* ``attention``: self attention, B x H x L x E with E in {64, 128}, L from 512 to 16384, causal or
  not; the batch shrinks as L grows so that every row holds 16k tokens (FlashAttention's protocol).
* ``decode``: one query row against a long key cache (Lq = 1), forward only.
* ``cross``: Lq != Lk (image tokens attending to text tokens and the reverse), not causal.
* ``se``: the squeeze-and-excitation layers of SE-ResNet50, EfficientNet-B0 and MobileNetV3-Large
  (read off timm's models at 224x224) at batch 64 and 256, NCHW and channels_last.
* ``cbam``: the CBAM layers of a CBAM-ResNet50 (timm ResNet-50 bottlenecks with ``attn_layer="cbam"``),
  same batches and layouts.
* ``model``: whole training steps (see ``bench/models.py``).

``cases(family, mode)`` gives the list for a mode: ``"full"`` (the GPU suite), ``"quick"`` (a few of
each, GPU) or ``"cpu"`` (small shapes for the CPU path).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

FAMILIES = ("attention", "decode", "cross", "se", "cbam", "model")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("full", "quick", "cpu")

#: tokens per attention row (B * L) in the self-attention sweep
TOKENS = 16384
#: model width of the attention sweep: H = WIDTH // E
WIDTH = 2048


@dataclass(frozen=True)
class Case:
    """One problem size. ``params`` holds the shape (B, H, Lq, Lk, E, causal for attention; N, C, H,
    W, Cr, act, gate, layout for SE/CBAM); ``x`` is the value on the plots' horizontal axis and
    ``series`` groups the rows drawn as one panel (say "E64 causal")."""

    family: str
    label: str
    params: Dict[str, Any]
    x: float
    series: str
    directions: tuple = DIRECTIONS
    source: str = ""
    extra: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def op(self) -> str:
        return {"attention": "scaled_dot_product_attention", "decode": "scaled_dot_product_attention",
                "cross": "scaled_dot_product_attention", "se": "squeeze_excite", "cbam": "cbam",
                "model": "model"}[self.family]


# --------------------------------------------------------------------------------------- attention
def _attn(family: str, b: int, h: int, lq: int, lk: int, e: int, causal: bool, series: str, x: float,
          directions=DIRECTIONS) -> Case:
    label = f"B{b} H{h} Lq{lq} Lk{lk} E{e}{' causal' if causal else ''}"
    return Case(family, label, dict(B=b, H=h, Lq=lq, Lk=lk, E=e, causal=causal), x, series, directions)


def attention_cases(mode: str) -> List[Case]:
    if mode == "cpu":
        grid = [(128, 64), (256, 64), (512, 64)]
        tokens, width = 1024, 256
    else:
        lengths = [512, 1024, 2048, 4096, 8192, 16384] if mode == "full" else [1024, 4096, 16384]
        grid = [(L, e) for e in (64, 128) for L in lengths]
        tokens, width = TOKENS, WIDTH
    out = []
    for causal in (False, True):
        for L, e in grid:
            out.append(_attn("attention", max(1, tokens // L), width // e, L, L, e, causal,
                             f"E{e}{' causal' if causal else ''}", L))
    if mode == "cpu":  # the memory column at a length where Lq x Lk scores (1 GiB here) would show
        out.append(_attn("attention", 1, 4, 8192, 8192, 64, True, "E64 causal, long", 8192, ("fwd",)))
    return out


def decode_cases(mode: str) -> List[Case]:
    if mode == "cpu":
        lks, b, h, e = [1024, 4096], 2, 4, 64
    else:
        lks = [4096, 16384, 65536] if mode == "full" else [16384]
        b, h, e = 8, 32, 128
    return [_attn("decode", b, h, 1, lk, e, False, f"Lq=1 B{b} H{h} E{e}", lk, ("fwd",)) for lk in lks]


def cross_cases(mode: str) -> List[Case]:
    if mode == "cpu":
        pairs, b, h, e = [(256, 77), (77, 256)], 2, 4, 64
    elif mode == "quick":
        pairs, b, h, e = [(4096, 77), (1024, 4096)], 8, 16, 64
    else:
        pairs, b, h, e = [(4096, 77), (16384, 77), (1024, 4096), (4096, 1024), (1024, 16384)], 8, 16, 64
    return [_attn("cross", b, h, lq, lk, e, False, f"cross B{b} H{h} E{e}", lq * lk) for lq, lk in pairs]


def attention_flops(p: Dict[str, Any], direction: str) -> float:
    """DESIGN.md section 6: forward 4*B*H*Lq*Lk*E, half with causal masking; backward 2.5x forward."""
    fwd = 4.0 * p["B"] * p["H"] * p["Lq"] * p["Lk"] * p["E"] * (0.5 if p["causal"] else 1.0)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[direction]


def attention_inputs(p: Dict[str, Any], dtype: torch.dtype, device, requires_grad: bool) -> Dict[str, Any]:
    def draw(L):
        t = torch.randn(p["B"], p["H"], L, p["E"], device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return dict(query=draw(p["Lq"]), key=draw(p["Lk"]), value=draw(p["Lk"]), is_causal=p["causal"])


# ------------------------------------------------------------------------------------- SE and CBAM
#: (C, H=W, Cr) of each SE layer at 224x224 input, read off timm's models (duplicates dropped)
SE_LAYERS = {
    "seresnet50": dict(act="relu", gate="sigmoid", layers=[(256, 56, 16), (512, 28, 32), (1024, 14, 64),
                                                           (2048, 7, 128)]),
    "efficientnet_b0": dict(act="silu", gate="sigmoid", layers=[
        (32, 112, 8), (96, 56, 4), (144, 56, 6), (144, 28, 6), (240, 28, 10), (240, 14, 10), (480, 14, 20),
        (672, 14, 28), (672, 7, 28), (1152, 7, 48)]),
    "mobilenetv3_large_100": dict(act="relu", gate="hardsigmoid", layers=[
        (72, 28, 24), (120, 28, 32), (480, 14, 120), (672, 14, 168), (672, 7, 168), (960, 7, 240)]),
}
#: CBAM-ResNet50: timm's ResNet-50 with ``block_args=dict(attn_layer="cbam")`` (CbamModule, reduction
#: 16, 7x7 spatial conv, ReLU / sigmoid)
CBAM_LAYERS = {"cbam_resnet50": dict(act="relu", gate="sigmoid", layers=[
    (256, 56, 16), (512, 28, 32), (1024, 14, 64), (2048, 7, 128)])}

_QUICK_MODELS = {"se": ["seresnet50", "mobilenetv3_large_100"], "cbam": ["cbam_resnet50"]}


def _image_cases(family: str, table: Dict[str, Dict], mode: str) -> List[Case]:
    out = []
    if mode == "cpu":
        batches, layouts = [2], ["nchw", "nhwc"]
    elif mode == "quick":
        batches, layouts = [64], ["nchw", "nhwc"]
    else:
        batches, layouts = [64, 256], ["nchw", "nhwc"]
    for model, spec in table.items():
        if mode == "quick" and model not in _QUICK_MODELS[family]:
            continue
        layers = spec["layers"]
        if mode == "quick":
            layers = [layers[0], layers[len(layers) // 2], layers[-1]]
        elif mode == "cpu":
            layers = [layers[0]]
        for n in batches:
            for layout in layouts:
                for c, hw, cr in layers:
                    p = dict(N=n, C=c, H=hw, W=hw, Cr=cr, act=spec["act"], gate=spec["gate"], layout=layout)
                    if family == "cbam":
                        p["k"] = 7
                    label = f"{model} N{n} C{c} {hw}x{hw} Cr{cr} {layout}"
                    out.append(Case(family, label, p, float(n * c * hw * hw), f"N{n} {layout}", source=model))
    return out


def se_cases(mode: str) -> List[Case]:
    return _image_cases("se", SE_LAYERS, mode)


def cbam_cases(mode: str) -> List[Case]:
    return _image_cases("cbam", CBAM_LAYERS, mode)


def image_bytes(p: Dict[str, Any], dtype: torch.dtype, direction: str) -> float:
    """The fewest bytes an SE/CBAM layer must move: forward reads x and writes y; backward reads x and
    dy and writes dx (the weights are a rounding error next to x)."""
    numel = p["N"] * p["C"] * p["H"] * p["W"]
    size = torch.empty((), dtype=dtype).element_size()
    return float(numel * size * {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[direction])


def _weight(*shape, scale: float, dtype, device, requires_grad: bool) -> Tensor:
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(requires_grad)


def image_inputs(family: str, p: Dict[str, Any], dtype: torch.dtype, device, requires_grad: bool) -> Dict[str, Any]:
    """x and the layer's weights, drawn at the scale of an initialised layer. CBAM's BatchNorm
    buffers are fp32 (a BatchNorm keeps its state fp32 under autocast)."""
    n, c, h, w, cr = p["N"], p["C"], p["H"], p["W"], p["Cr"]
    x = torch.randn(n, c, h, w, device=device, dtype=dtype)
    if p["layout"] == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(requires_grad)
    kw = dict(dtype=dtype, device=device, requires_grad=requires_grad)
    inputs: Dict[str, Any] = dict(x=x, fc1_weight=_weight(cr, c, scale=c ** -0.5, **kw),
                                  fc2_weight=_weight(c, cr, scale=cr ** -0.5, **kw))
    if family == "se":
        inputs["fc1_bias"] = _weight(cr, scale=0.1, **kw)
        inputs["fc2_bias"] = _weight(c, scale=0.1, **kw)
        inputs["activation"], inputs["gate"] = p["act"], p["gate"]
    else:
        k = p["k"]
        inputs["conv_weight"] = _weight(1, 2, k, k, scale=(2 * k * k) ** -0.5, **kw)
        inputs["activation"], inputs["gate"] = p["act"], p["gate"]
        f32 = dict(device=device, dtype=torch.float32)
        inputs["bn_weight"] = (1 + 0.1 * torch.randn(1, **f32)).requires_grad_(requires_grad)
        inputs["bn_bias"] = (0.1 * torch.randn(1, **f32)).requires_grad_(requires_grad)
        inputs["bn_running_mean"] = 0.1 * torch.randn(1, **f32)
        inputs["bn_running_var"] = 1 + 0.1 * torch.rand(1, **f32)
        # training steps (backward) normalise with batch statistics, as BatchNorm in train mode
        inputs["bn_training"] = requires_grad
    return inputs


# ------------------------------------------------------------------------------------------ models
def model_cases(mode: str) -> List[Case]:
    """Whole training steps (forward + backward + SGD step) of a converted model against the original,
    and (``inference=True``) forwards in eval mode under ``torch.no_grad``, where torch's
    MultiheadAttention and Transformer layers take their fused inference fast path."""
    if mode == "cpu":
        mha = dict(batch=4, L=512, d=512, heads=8)
        encoder = dict(batch=2, L=128, d=256, heads=4, layers=2)
        specs = [("seresnet18", dict(batch=2, size=64)), ("transformer_encoder", encoder),
                 ("transformer_encoder", dict(encoder, inference=True)), ("multihead_attention", mha),
                 ("multihead_attention", dict(mha, inference=True))]
    elif mode == "quick":
        specs = [("seresnet50", dict(batch=64, size=224)),
                 ("transformer_encoder", dict(batch=8, L=2048, d=1024, heads=16, layers=4))]
    else:
        specs = [("seresnet50", dict(batch=64, size=224)), ("efficientnet_b0", dict(batch=128, size=224)),
                 ("cbam_resnet50", dict(batch=64, size=224)),
                 ("transformer_encoder", dict(batch=8, L=2048, d=1024, heads=16, layers=12))]
    out = []
    for name, p in specs:
        label = name + " " + " ".join(f"{k}={v}" for k, v in p.items() if k != "inference")
        label += " inference" if p.get("inference") else " train"
        out.append(Case("model", label, dict(model=name, **p), 0.0, name, ("fwd" if p.get("inference") else "fwd+bwd",),
                        source=name))
    return out


_BUILDERS = dict(attention=attention_cases, decode=decode_cases, cross=cross_cases, se=se_cases,
                 cbam=cbam_cases, model=model_cases)


def cases(family: str, mode: str, match: Optional[str] = None) -> List[Case]:
    """The cases of ``family`` in ``mode``; ``match`` keeps those whose label contains it."""
    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    found = _BUILDERS[family](mode)
    return [c for c in found if match is None or match in c.label]


def work(case: Case, dtype: torch.dtype, direction: str) -> Optional[Dict[str, float]]:
    """{"flop": n} for attention, {"bytes": n} for SE/CBAM; None for whole models."""
    if case.family in ("attention", "decode", "cross"):
        return {"flop": attention_flops(case.params, direction)}
    if case.family in ("se", "cbam"):
        return {"bytes": image_bytes(case.params, dtype, direction)}
    return None


def make_inputs(case: Case, dtype: torch.dtype, device, requires_grad: bool) -> Dict[str, Any]:
    if case.family in ("attention", "decode", "cross"):
        return attention_inputs(case.params, dtype, device, requires_grad)
    return image_inputs(case.family, case.params, dtype, device, requires_grad)
