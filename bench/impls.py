"""The implementations each benchmark row times: attn_fast and its competitors (DESIGN.md section 6).

Every implementation is built from the *same* input tensors (``bench.cases.make_inputs``) and returns
a :class:`Prepared`: a zero-argument callable giving the output, and the leaf tensors whose gradients
a backward pass writes. A competitor that cannot run here raises :class:`Unavailable` with the reason
(not installed, no such SDPA backend on this device, no kernel for this shape...), which the runner
reports instead of a time.

Attention: attn_fast, the reference eager and under ``torch.compile``, torch SDPA forced to each
backend (flash, efficient, cudnn, math) with ``torch.nn.attention.sdpa_kernel``, FlexAttention
(compiled, with a block mask for causal), and ``flash_attn.flash_attn_func`` when importable.
SE: attn_fast, the reference eager / compiled, torchvision ``SqueezeExcitation`` and timm ``SEModule``
eager / compiled. CBAM: attn_fast, the reference eager / compiled, timm ``CbamModule`` eager /
compiled (torchvision has no CBAM).

``torch.compile`` runs with its default settings (as a user would call it); dynamo's recompile limit
is raised so that every shape really runs compiled code rather than falling back to eager.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import attn_fast
from attn_fast import reference

from .cases import Case

ATTENTION_IMPLS = ("attn_fast", "reference", "reference+compile", "sdpa-flash", "sdpa-efficient",
                   "sdpa-cudnn", "sdpa-math", "flex_attention", "flash_attn")
SE_IMPLS = ("attn_fast", "reference", "reference+compile", "torchvision", "torchvision+compile", "timm",
            "timm+compile")
CBAM_IMPLS = ("attn_fast", "reference", "reference+compile", "timm", "timm+compile")
OURS = "attn_fast"


class Unavailable(Exception):
    """This implementation cannot run this case here; the message says why."""


@dataclass
class Prepared:
    call: Callable[[], Tensor]
    leaves: List[Tensor]


def impl_names(family: str) -> Sequence[str]:
    return {"attention": ATTENTION_IMPLS, "decode": ATTENTION_IMPLS, "cross": ATTENTION_IMPLS,
            "se": SE_IMPLS, "cbam": CBAM_IMPLS}[family]


def _leaves(inputs: Dict[str, Any]) -> List[Tensor]:
    return [v for v in inputs.values() if isinstance(v, Tensor) and v.requires_grad]


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 512)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4096)
    return torch.compile(fn)


def _compile_module(m: nn.Module) -> Callable:
    _compiled(reference.scaled_dot_product_attention)  # raises the recompile limits once
    return torch.compile(m)


# --------------------------------------------------------------------------------------- attention
def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def _attention(name: str, case: Case, inputs: Dict[str, Any]) -> Prepared:
    q, k, v, causal = inputs["query"], inputs["key"], inputs["value"], inputs["is_causal"]
    leaves = _leaves(inputs)
    if name == OURS:
        return Prepared(lambda: attn_fast.scaled_dot_product_attention(q, k, v, is_causal=causal), leaves)
    if name == "reference":
        return Prepared(lambda: reference.scaled_dot_product_attention(q, k, v, is_causal=causal), leaves)
    if name == "reference+compile":
        fn = _compiled(reference.scaled_dot_product_attention)
        return Prepared(lambda: fn(q, k, v, is_causal=causal), leaves)
    if name.startswith("sdpa-"):
        from torch.nn.attention import sdpa_kernel

        backend = _sdpa_backend(name[5:])

        def call():
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        try:  # torch refuses a backend it has no kernel for on this device, dtype or shape
            with torch.no_grad():
                call()
        except RuntimeError as e:
            if "No viable backend" in str(e) or "No available kernel" in str(e):
                raise Unavailable(f"torch has no {name[5:]} SDPA kernel for this device/dtype/shape")
            raise
        return Prepared(call, leaves)
    if name == "flex_attention":
        if q.device.type != "cuda":
            raise Unavailable("benchmarked on CUDA only")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Unavailable(f"torch {torch.__version__} has no FlexAttention ({e})")
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, q.shape[-2], k.shape[-2],
                                           device=q.device)
        fn = _compiled(flex_attention)
        return Prepared(lambda: fn(q, k, v, block_mask=block_mask), leaves)
    if name == "flash_attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            raise Unavailable("flash_attn is not installed")
        if case.params["Lq"] != case.params["Lk"] and causal:
            raise Unavailable("flash_attn aligns causal masks bottom-right; torch top-left")
        # flash_attn takes (B, L, H, E): made once here, outside the timed region
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))
        return Prepared(lambda: flash_attn_func(qt, kt, vt, causal=causal), _leaves(dict(q=qt, k=kt, v=vt)))
    raise ValueError(f"unknown attention implementation {name!r}")


# ------------------------------------------------------------------------------------- SE and CBAM
_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
                "hardsigmoid": nn.Hardsigmoid}


def _copy_into(module: nn.Module, tensors: Dict[str, Tensor], like: Tensor, requires_grad: bool) -> nn.Module:
    """Load ``tensors`` (state_dict names -> values, reshaped to the module's shapes) into ``module``,
    moved to ``like``'s device and dtype (BatchNorm state stays fp32) and memory format."""
    state = module.state_dict()
    for key, value in tensors.items():
        state[key] = value.detach().reshape(state[key].shape)
    module.load_state_dict(state)
    module.to(device=like.device)
    for m in module.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.to(dtype=like.dtype)
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        module.to(memory_format=torch.channels_last)
    module.requires_grad_(requires_grad)
    return module


def _module_inputs(module: nn.Module, x: Tensor, requires_grad: bool) -> List[Tensor]:
    return ([x] if requires_grad else []) + [p for p in module.parameters() if p.requires_grad]


def _functional(name: str, ours: Callable, ref: Callable, inputs: Dict[str, Any]) -> Optional[Prepared]:
    """attn_fast's function, the reference eager or compiled, all called with ``inputs``; None for a
    module implementation."""
    fn = {OURS: ours, "reference": ref}.get(name)
    if name == "reference+compile":
        fn = _compiled(ref)
    if fn is None:
        return None
    return Prepared(lambda: fn(**inputs), _leaves(inputs))


def _se(name: str, case: Case, inputs: Dict[str, Any]) -> Prepared:
    x, p = inputs["x"], case.params
    grad = x.requires_grad
    functional = _functional(name, attn_fast.squeeze_excite, reference.squeeze_excite, inputs)
    if functional is not None:
        return functional
    weights = {"fc1.weight": inputs["fc1_weight"], "fc1.bias": inputs["fc1_bias"],
               "fc2.weight": inputs["fc2_weight"], "fc2.bias": inputs["fc2_bias"]}
    act, gate = _ACTIVATIONS[p["act"]], _ACTIVATIONS[p["gate"]]
    if name.startswith("torchvision"):
        try:
            from torchvision.ops import SqueezeExcitation
        except ImportError:
            raise Unavailable("torchvision is not installed")
        module = SqueezeExcitation(p["C"], p["Cr"], activation=act, scale_activation=gate)
    elif name.startswith("timm"):
        try:
            from timm.layers import SEModule
        except ImportError:
            raise Unavailable("timm is not installed")
        module = SEModule(p["C"], rd_channels=p["Cr"], act_layer=act, gate_layer=gate)
    else:
        raise ValueError(f"unknown SE implementation {name!r}")
    module = _copy_into(module, weights, x, grad)
    fn = _compile_module(module) if name.endswith("+compile") else module
    return Prepared(lambda: fn(x), _module_inputs(module, x, grad))


def _cbam(name: str, case: Case, inputs: Dict[str, Any]) -> Prepared:
    x, p = inputs["x"], case.params
    grad = x.requires_grad
    functional = _functional(name, attn_fast.cbam, reference.cbam, inputs)
    if functional is not None:
        return functional
    if not name.startswith("timm"):
        raise ValueError(f"unknown CBAM implementation {name!r}")
    try:
        from timm.layers.cbam import CbamModule
    except ImportError:
        raise Unavailable("timm is not installed")
    module = CbamModule(p["C"], rd_channels=p["Cr"], spatial_kernel_size=p["k"],
                        act_layer=_ACTIVATIONS[p["act"]], gate_layer=_ACTIVATIONS[p["gate"]])
    weights = {"channel.fc1.weight": inputs["fc1_weight"], "channel.fc2.weight": inputs["fc2_weight"],
               "spatial.conv.conv.weight": inputs["conv_weight"], "spatial.conv.bn.weight": inputs["bn_weight"],
               "spatial.conv.bn.bias": inputs["bn_bias"], "spatial.conv.bn.running_mean": inputs["bn_running_mean"],
               "spatial.conv.bn.running_var": inputs["bn_running_var"]}
    module = _copy_into(module, weights, x, grad).train(inputs["bn_training"])
    fn = _compile_module(module) if name.endswith("+compile") else module
    return Prepared(lambda: fn(x), _module_inputs(module, x, grad))


def prepare(name: str, case: Case, inputs: Dict[str, Any]) -> Prepared:
    """Build implementation ``name`` for ``case`` on ``inputs``; raises :class:`Unavailable`."""
    if case.family in ("attention", "decode", "cross"):
        return _attention(name, case, inputs)
    if case.family == "se":
        return _se(name, case, inputs)
    if case.family == "cbam":
        return _cbam(name, case, inputs)
    raise ValueError(f"no implementations for family {case.family!r}")
