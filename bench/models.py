"""Whole-model training steps: a model converted by ``attn_fast.convert`` against the same model
unconverted (same weights, same batch). One step is forward, loss, backward and an SGD update, under
``torch.autocast`` in the benchmark's dtype on a GPU (fp32 on the CPU).

Models: timm ``seresnet50``, ``efficientnet_b0``, a CBAM-ResNet50 (timm ``resnet50`` with
``block_args=dict(attn_layer="cbam")``), ``seresnet18`` (CPU runs), a ``transformer_encoder``
(``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer``, batch_first, GELU, dropout 0.1) and, on
the CPU, one ``multihead_attention`` layer (self-attention, ``need_weights=False``). A case with
``inference=True`` times a forward in eval mode under ``torch.no_grad`` instead of a step (torch's
MultiheadAttention and Transformer layers then take their fused inference fast path).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn

import attn_fast

from .impls import Unavailable

MODEL_IMPLS = ("attn_fast", "original", "original+compile")


class SelfAttention(nn.Module):
    """One nn.MultiheadAttention as a model: self-attention without the weights (as the Transformer
    layers call it)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def build(params: Dict[str, Any], device: torch.device) -> Tuple[nn.Module, torch.Tensor, Callable]:
    """(model, input batch, loss function) for a model case."""
    name = params["model"]
    if name == "multihead_attention":
        x = torch.randn(params["batch"], params["L"], params["d"])
        return SelfAttention(params["d"], params["heads"]).to(device), x.to(device), lambda y: y.float().square().mean()
    if name == "transformer_encoder":
        layer = nn.TransformerEncoderLayer(params["d"], params["heads"], 4 * params["d"], dropout=0.1,
                                           activation="gelu", batch_first=True)
        model = nn.TransformerEncoder(layer, params["layers"], enable_nested_tensor=False)
        x = torch.randn(params["batch"], params["L"], params["d"])
        return model.to(device), x.to(device), lambda y: y.float().square().mean()
    try:
        import timm
    except ImportError:
        raise Unavailable("timm is not installed")
    if name == "cbam_resnet50":
        model = timm.create_model("resnet50", block_args=dict(attn_layer="cbam"))
    else:
        model = timm.create_model(name)
    x = torch.randn(params["batch"], 3, params["size"], params["size"])
    target = torch.randint(0, model.num_classes, (params["batch"],), device=device)
    model = model.to(device).to(memory_format=torch.channels_last)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    return model, x, lambda y: nn.functional.cross_entropy(y.float(), target)


def prepare_step(impl: str, params: Dict[str, Any], dtype: torch.dtype, device: torch.device,
                 base: Tuple[nn.Module, torch.Tensor, Callable]) -> Callable[[], torch.Tensor]:
    """One training step of ``impl`` ("attn_fast": converted, "original", "original+compile") on a
    deep copy of the ``base`` model; with ``params["inference"]``, one forward in eval mode under
    ``torch.no_grad`` instead."""
    model, x, loss_fn = base
    inference = bool(params.get("inference"))
    model = copy.deepcopy(model).train(not inference)
    if impl == "attn_fast":
        model, report = attn_fast.convert(model, report=True)
        if not report.swapped:
            raise Unavailable("convert found no layer to swap")
    elif impl == "original+compile":
        model = torch.compile(model)
    elif impl != "original":
        raise ValueError(f"unknown model implementation {impl!r}")
    autocast = (torch.autocast(device.type, dtype=dtype) if device.type == "cuda" and dtype != torch.float32
                else contextlib.nullcontext())
    if inference:
        def forward():
            with torch.no_grad(), autocast:
                return model(x)

        return forward
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        with autocast:
            loss = loss_fn(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step
