"""``attn_fast.convert``: swap, in place, the attention layers of a model for attn_fast's modules.

Every layer of a known class (or a subclass that keeps its forward) is replaced by the attn_fast
module built around its own submodules (``from_module``), so parameters, buffers and state_dict keys
stay the same: optimizers, checkpoints and ``load_state_dict`` keep working. A layer the kernels do
not cover (an activation they do not compute, a subclass with its own forward, ...) is left alone
and reported with the reason; nothing is converted half-way.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

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
    swapped: List[Swap] = field(default_factory=list)
    skipped: List[Skip] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"attn_fast.convert: {len(self.swapped)} layer(s) swapped, {len(self.skipped)} left as they were"]
        lines += [f"  swapped {s.name or '<model>'}: {s.original} -> {s.replacement}" for s in self.swapped]
        lines += [f"  left    {s.name or '<model>'}: {s.layer} ({s.reason})" for s in self.skipped]
        return "\n".join(lines)


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
        raise TypeError(f"convert: include/exclude must be a name pattern, a class, a predicate or an iterable "
                        f"of these, got {type(selector).__name__}") from None
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
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    result = ConversionReport()
    places: Dict[int, List[Tuple[str, Optional[nn.Module], str]]] = {}
    modules: Dict[int, nn.Module] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            places.setdefault(id(child), []).append((name, parent, attr))
            modules[id(child)] = child
    places.setdefault(id(model), []).append(("", None, ""))
    modules[id(model)] = model
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
    return (root, result) if report else root
