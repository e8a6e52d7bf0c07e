"""Drop-in for timm's ViT self-attention (``timm.layers.attention.Attention``, used by
``VisionTransformer``, DeiT, BEiT-style blocks...), running ``attn_fast.scaled_dot_product_attention``.

``VitAttention.from_module(m)`` keeps ``m``'s submodules (``qkv``, ``q_norm``, ``k_norm``,
``attn_drop``, ``norm``, ``proj``, ``proj_drop``, optional ``gate``), so parameters and state_dict
keys are the same; the forward is timm's with the fused kernel for softmax(Q K^T) V.
"""
from __future__ import annotations

from typing import Optional

import torch.fx
from torch import Tensor, nn

from .. import functional
from ._layers import UnsupportedLayerError, autocast_off, check_input, fx_traced
from .squeeze_excite import _adopt, _original_forward

__all__ = ["VitAttention"]

#: The classes of timm's ViT attention across versions ("module", "qualname").
TIMM_ATTENTION = (("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention"))


def _attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
               scale: float) -> Tensor:
    """The fused attention of VitAttention (a float mask in q's dtype, as the timm module's SDPA call
    takes it; q, k, v come from the qkv projection, in the autocast dtype under autocast). A
    module-level function so that torch.fx records it as one call (``torch.fx.wrap`` below); the rest
    of the forward traces as timm's does."""
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    with autocast_off(q):
        return functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                       is_causal=is_causal, scale=scale)


torch.fx.wrap("_attention")


class VitAttention(nn.Module):
    r"""timm's ViT multi-head self-attention, fused: qkv projection, optional q/k norms, the fused
    attention kernel (dropout of ``attn_drop.p`` in training), optional norm and gate, output
    projection. ``forward(x, attn_mask=None, is_causal=False)`` as timm's (``attn_mask`` in
    scaled_dot_product_attention's convention: bool True = may attend, or an additive float mask)."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if not fx_traced(x):  # under torch.fx the checks of the recorded ops run instead
            check_input("VitAttention", "x", x, self.qkv.weight, ndims=(3,), legend="(B, N, C)",
                        channels=self.qkv.in_features, dim=2, unit="features")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = _attention(q, k, v, attn_mask, self.attn_drop.p if self.training else 0.0, is_causal, self.scale)
        x = x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"

    @classmethod
    def from_module(cls, m: nn.Module) -> "VitAttention":
        """Wrap a timm ViT ``Attention``, keeping its submodules (parameters shared)."""
        for module_path, qualname in TIMM_ATTENTION:
            try:
                _original_forward(m, module_path, qualname)
                break
            except UnsupportedLayerError as err:
                last = err
        else:
            raise last
        if m.head_dim > functional.MAX_HEAD_DIM:
            raise UnsupportedLayerError(f"head size {m.head_dim} is over the kernels' {functional.MAX_HEAD_DIM}")
        if type(m.attn_drop) is not nn.Dropout:
            raise UnsupportedLayerError(f"attn_drop is {type(m.attn_drop).__qualname__}, expected nn.Dropout")
        children = {name: getattr(m, name) for name in ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")}
        norm = getattr(m, "norm", None)  # timm versions before the norm/gate options have neither
        children["norm"] = nn.Identity() if norm is None else norm
        new = _adopt(cls, m, **children)
        new.gate = getattr(m, "gate", None)
        new.num_heads, new.head_dim = m.num_heads, m.head_dim
        new.scale = float(getattr(m, "scale", m.head_dim ** -0.5))
        return new
