"""``attn_fast.convert``: swap, in place, the attention layers of a model for attn_fast's modules.

Every layer of a known class (or a subclass that keeps its forward) is replaced by the attn_fast
module built around its own submodules (``from_module``), so parameters, buffers and state_dict keys
stay the same: optimizers, checkpoints and ``load_state_dict`` keep working. A layer the kernels do
not cover (an activation they do not compute, a subclass with its own forward, ...) is left alone
and reported with the reason; nothing is converted half-way. The hooks registered on a swapped layer
(forward, forward pre-, backward and state_dict hooks) move to its replacement, and handles made
before the conversion still remove them.

What convert cannot change is reported as "not converted", with the reason: TorchScript modules
(``torch.jit.script`` / ``torch.jit.trace``: compiled code), ``torch.fx`` GraphModules (the traced
code calls the layers' operations directly), and layers whose class name says attention (or
squeeze-excite, CBAM, ECA) for which there is no converter (timm's Swin ``WindowAttention``, EVA's
``EvaAttention``, BEiT's ``Attention``, ...).
"""
from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

import torch
from torch import nn
from torch.fx import GraphModule

from ._validate import InputTypeError
from .nn import (CBAM, EcaModule, EffectiveSEModule, EfficientNetSqueezeExcite, MultiheadAttention, SEModule,
                 SqueezeExcite, UnsupportedLayerError, VitAttention)

__all__ = ["convert", "ConversionReport", "Swap", "Skip", "CONVERTERS"]

log = logging.getLogger("attn_fast.convert")

#: Classes convert() swaps (by "module.qualname", so torchvision and timm need not be installed),
#: and the attn_fast module whose ``from_module`` wraps them.
CONVERTERS: Dict[str, type] = {
    "torch.nn.modules.activation.MultiheadAttention": MultiheadAttention,
    "torchvision.ops.misc.SqueezeExcitation": SqueezeExcite,
    "timm.layers.squeeze_excite.SEModule": SEModule,
    "timm.layers.squeeze_excite.EffectiveSEModule": EffectiveSEModule,
    "timm.layers.eca.EcaModule": EcaModule,
    "timm.models._efficientnet_blocks.SqueezeExcite": EfficientNetSqueezeExcite,
    "timm.layers.cbam.CbamModule": CBAM,
    "timm.layers.cbam.LightCbamModule": CBAM,
    "timm.layers.attention.Attention": VitAttention,
    "timm.models.vision_transformer.Attention": VitAttention,
}

_OURS = (MultiheadAttention, VitAttention, SqueezeExcite, SEModule, EffectiveSEModule, EcaModule,
         EfficientNetSqueezeExcite, CBAM)

#: What include/exclude take: a name pattern (fnmatch on the qualified module name, e.g.
#: "blocks.*.se"), a layer class, a predicate (name, module) -> bool, or an iterable of these.
Selector = Union[str, type, Callable[[str, nn.Module], bool], Iterable]


@dataclass(frozen=True)
class Swap:
    """One replaced layer: its qualified name(s), the original class and the attn_fast class."""

    name: str
    original: str
    replacement: str


@dataclass(frozen=True)
class Skip:
    """One attention layer left as it was, and why."""

    name: str
    layer: str
    reason: str


@dataclass
class ConversionReport:
    """What convert did: ``swapped`` layers; ``skipped``, layers of a class it converts that it left as
    they were (a configuration the kernels do not cover, include/exclude); ``not_converted``, what it
    cannot convert at all (TorchScript and fx modules, attention layers with no converter)."""

    swapped: List[Swap] = field(default_factory=list)
    skipped: List[Skip] = field(default_factory=list)
    not_converted: List[Skip] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"attn_fast.convert: {len(self.swapped)} layer(s) swapped, {len(self.skipped)} left as they were"
        if self.not_converted:
            head += f", {len(self.not_converted)} not converted"
        elif not self.swapped and not self.skipped:
            head += " (no attention layer found)"
        lines = [head]
        lines += [f"  swapped {s.name or '<model>'}: {s.original} -> {s.replacement}" for s in self.swapped]
        lines += [f"  left    {s.name or '<model>'}: {s.layer} ({s.reason})" for s in self.skipped]
        lines += [f"  not converted {s.name or '<model>'}: {s.layer}, because {s.reason}" for s in self.not_converted]
        return "\n".join(lines)


#: Class names of layers that look like attention (or squeeze-excite, CBAM, ECA, ...): a layer of such
#: a class that convert has no converter for is reported as not converted.
_ATTENTION_NAME = re.compile(r"Attention|Attn|Excit|Cbam|CBAM|^C?[Ee]ca(Module)?$|^SE(Module|Layer|Block)?$|"
                             r"GlobalContext|NonLocal|SelectiveKernel")

#: nn.Module's hook tables (forward, forward pre-, backward, state_dict and load_state_dict hooks, and
#: the side tables of with_kwargs / always_call), read from a fresh module so every torch version's are.
_HOOK_TABLES: Tuple[str, ...] = tuple(k for k, v in nn.Module().__dict__.items() if "hook" in k and isinstance(v, dict))


#: What torch wraps a hook in when it is called with its module (held by a weak reference).
_WrappedHook = getattr(torch.nn.modules.module, "_WrappedHook", type(None))


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (the replacement of ``old``) ``old``'s hooks. ``new`` takes over the very tables
    the handles made on ``old`` point to (so ``handle.remove()`` still works), ``old`` keeps copies:
    the two share no table, and a hook added to one later does not reach the other."""
    for key in _HOOK_TABLES:
        table = old.__dict__.get(key)
        if table is None:
            continue
        mine = new.__dict__.get(key)
        if mine is not None and mine is not table:
            for hook_id, hook in mine.items():
                table.setdefault(hook_id, hook)
        old.__dict__[key] = type(table)(table)
        new.__dict__[key] = table
        for hook_id, hook in list(table.items()):
            # load_state_dict pre-hooks registered with the module hold a weak reference to it
            if isinstance(hook, _WrappedHook) and hook.with_module and hook.module() is old:
                table[hook_id] = _WrappedHook(hook.hook, new)
    if old.__dict__.get("_is_full_backward_hook") is not None:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]


def _scripted(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def _graph_module(module: nn.Module) -> bool:
    return isinstance(module, GraphModule)


def _class_label(module: nn.Module) -> str:
    if _scripted(module):
        original = getattr(module, "original_name", None)
        return f"{type(module).__name__} of {original}" if original else type(module).__name__
    return type(module).__qualname__


def _known_class(module: nn.Module) -> Optional[str]:
    for cls in type(module).__mro__:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in CONVERTERS:
            return key
    return None


def _matches(selector: Optional[Selector], name: str, module: nn.Module) -> bool:
    if selector is None:
        return False
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(name, selector)
    if isinstance(selector, type):
        return isinstance(module, selector)
    if callable(selector):
        return bool(selector(name, module))
    try:
        items = list(selector)
    except TypeError:
        raise InputTypeError(f"convert: include/exclude must be a name pattern, a class, a predicate or an "
                             f"iterable of these, got {type(selector).__name__}") from None
    return any(_matches(s, name, module) for s in items)


def convert(model: nn.Module, *, include: Optional[Selector] = None, exclude: Optional[Selector] = None,
            report: bool = False) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace, in place, every attention layer attn_fast covers with its attn_fast module.

    Layers: ``torch.nn.MultiheadAttention`` (also inside ``nn.Transformer*Layer``), torchvision
    ``SqueezeExcitation``, timm ``SEModule``, ``EffectiveSEModule``, ``EcaModule``, the EfficientNet /
    MobileNetV3 block ``SqueezeExcite``, ``CbamModule``, ``LightCbamModule`` and the ViT self-attention
    ``Attention`` (see ``CONVERTERS``).

    Args:
        model: the model (changed in place; if the model itself is such a layer, the new module is
            returned instead).
        include: convert only the layers this selects (default: all); exclude: never these. Each is a
            name pattern (``fnmatch`` on the qualified name), a class, a predicate
            ``(name, module) -> bool``, or an iterable of these.
        report: also return a :class:`ConversionReport` naming what was swapped, and what was left
            and why (also logged to the "attn_fast.convert" logger).

    Returns:
        ``model``, or ``(model, report)`` with ``report=True``.
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    result = ConversionReport()
    places: Dict[int, List[Tuple[str, Optional[nn.Module], str]]] = {id(model): [("", None, "")]}
    modules: Dict[int, nn.Module] = {id(model): model}

    def walk(prefix: str, parent: nn.Module) -> None:
        # named_modules(remove_duplicate=False), in the same order, but not into TorchScript modules
        # (their submodules are compiled too)
        if _scripted(parent):
            return
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            places.setdefault(id(child), []).append((name, parent, attr))
            modules[id(child)] = child
            walk(name, child)

    walk("", model)
    _report_unconvertible(modules, places, result)
    root = model
    for key, module in modules.items():
        names = [p[0] for p in places[key]]
        name = names[0]
        if isinstance(module, _OURS):
            continue
        known = _known_class(module)
        if known is None:
            continue
        if include is not None and not any(_matches(include, n, module) for n in names):
            result.skipped.append(Skip(name, type(module).__qualname__, "not selected by include"))
            continue
        if any(_matches(exclude, n, module) for n in names):
            result.skipped.append(Skip(name, type(module).__qualname__, "excluded"))
            continue
        target = CONVERTERS[known]
        try:
            new = target.from_module(module)
        except UnsupportedLayerError as err:
            result.skipped.append(Skip(name, type(module).__qualname__, str(err)))
            continue
        if new is not module:
            _move_hooks(module, new)
        for _, parent, attr in places[key]:
            if parent is None:
                root = new
            else:
                parent._modules[attr] = new
        result.swapped.append(Swap(", ".join(n or "<model>" for n in names), type(module).__qualname__,
                                   f"attn_fast.nn.{target.__name__}"))
    for s in result.swapped:
        log.info("swapped %s: %s -> %s", s.name, s.original, s.replacement)
    for s in result.skipped:
        log.info("left %s: %s (%s)", s.name or "<model>", s.layer, s.reason)
    for s in result.not_converted:
        log.info("not converted %s: %s, because %s", s.name or "<model>", s.layer, s.reason)
    return (root, result) if report else root


def _report_unconvertible(modules: Dict[int, nn.Module], places: Dict[int, list], result: ConversionReport) -> None:
    """Fill ``result.not_converted``: TorchScript modules (the walk did not enter them), fx GraphModules,
    and the innermost layers that look like attention (by class name) with no converter, outside the
    layers convert knows and holding none (a block around a known layer, or around another such
    layer, is not reported: the layer inside is)."""
    def known_or_ours(m: nn.Module) -> bool:
        return isinstance(m, _OURS) or _known_class(m) is not None

    inside: Set[int] = set()  # below a known layer or an attn_fast layer
    for m in modules.values():
        if known_or_ours(m):
            inside.update(id(d) for d in m.modules() if d is not m)
    candidates: Dict[int, str] = {}
    for key, m in modules.items():
        name = places[key][0][0]
        if _scripted(m):
            result.not_converted.append(Skip(
                name, _class_label(m), "it is a TorchScript module (torch.jit.script or torch.jit.trace): its code is "
                "compiled, so its layers cannot be swapped; convert the nn.Module before scripting or tracing it"))
        elif _graph_module(m):
            result.not_converted.append(Skip(
                name, _class_label(m), "it is a torch.fx GraphModule: its traced code calls the layers' operations "
                "directly, so layers traced into it cannot be swapped (submodules it calls are still converted); "
                "convert the model before tracing it"))
        elif (key not in inside and not known_or_ours(m) and _ATTENTION_NAME.search(type(m).__name__)
              and not type(m).__module__.startswith("torch.")
              and not any(known_or_ours(d) for d in m.modules() if d is not m)):
            candidates[key] = name
    for key, name in candidates.items():
        m = modules[key]
        if any(id(d) in candidates for d in m.modules() if d is not m):
            continue  # a block holding an attention-like layer: that one is reported
        cls = type(m)
        result.not_converted.append(Skip(
            name, cls.__qualname__, f"convert has no converter for {cls.__module__}.{cls.__qualname__} (it looks like "
            "an attention layer; attn_fast.convert.CONVERTERS lists the classes it swaps)"))
