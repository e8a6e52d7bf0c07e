"""Drop-in ``torch.nn.MultiheadAttention`` running the fused attention kernel.

A subclass of torch's module: the same constructor, parameters (``in_proj_weight`` or
``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``, ``bias_k``/``bias_v``), state_dict, forward
signature and return values. Only the attention itself changes: with ``need_weights=False`` (what
``nn.TransformerEncoderLayer``/``DecoderLayer`` ask for) the projections are torch GEMMs and the
softmax(Q K^T) V part is ``attn_fast.scaled_dot_product_attention`` on strided views, with the masks
passed un-expanded where they broadcast; with ``need_weights=True`` (torch's default) the weights
must be materialised, so torch's own implementation runs, unchanged. Nested-tensor inputs go to
torch's implementation too (its inference fast path handles them).

Bad input raises ``attn_fast.InputError`` / ``InputTypeError`` naming the argument; where torch's
module asserts (ranks, the query's width, key vs value shapes, mask ranks and dtypes, the key
padding mask's shape) the exception is also an ``AssertionError``, and elsewhere a ``RuntimeError``
as torch's, so code catching what torch raises catches these too.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional
from .._validate import (FLOAT_DTYPES, InputError, InputTypeError, check_positive_int, check_probability, check_same,
                         check_tensor)
from ._layers import UnsupportedLayerError, _autocast_on, autocast_off

_FN = "MultiheadAttention"

__all__ = ["MultiheadAttention", "MultiheadAttentionAssertionError", "MultiheadAttentionTypeAssertionError"]


class MultiheadAttentionAssertionError(InputError, AssertionError):
    """A bad shape or rank for which ``torch.nn.MultiheadAttention`` fails an assertion: an
    ``InputError`` (ValueError, RuntimeError) that ``except AssertionError`` catches too."""


class MultiheadAttentionTypeAssertionError(InputTypeError, AssertionError):
    """A mask dtype ``torch.nn.MultiheadAttention`` rejects with an assertion (neither bool nor float):
    an ``InputTypeError`` (TypeError, RuntimeError) that ``except AssertionError`` catches too."""


def _traced_forward(module: "MultiheadAttention", query, key, value, key_padding_mask, need_weights, attn_mask,
                    average_attn_weights, is_causal):
    """``module.forward`` as one call in a torch.fx graph (``torch.fx.wrap`` below), as torch's own
    module is one leaf call there: its checks and its choice of path need real tensors."""
    return module.forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                          is_causal)


torch.fx.wrap("_traced_forward")


def _sdpa_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A MultiheadAttention mask (bool True = may NOT attend, or float added to the scores; checked by
    ``MultiheadAttention._check_masks``) in the convention of scaled_dot_product_attention (bool True =
    may attend, or float of the query's dtype)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    return mask.to(dtype)


def _as_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An SDPA-convention mask as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask


def _append_key(mask: Optional[Tensor]) -> Optional[Tensor]:
    """One more key position that every query may attend (bias_k / add_zero_attn)."""
    if mask is None:
        return None
    return F.pad(mask, (0, 1), value=True if mask.dtype == torch.bool else 0.0)


class MultiheadAttention(nn.MultiheadAttention):
    r"""``torch.nn.MultiheadAttention`` with the attention computed by attn_fast's fused kernel.

    Same arguments and behaviour as torch's module (see its documentation). Notes:

    * ``need_weights=True`` (torch's default) runs torch's implementation, which materialises the
      (N, heads, L, S) weights: O(L * S) memory, unfused. Pass ``need_weights=False`` (as the
      Transformer layers do) for the fused kernel: O(L + S) memory, dropout inside the kernel.
    * Rows whose keys are all masked give zeros (the kernel's convention).
    * ``is_causal=True`` is a hint, as in torch: it needs ``attn_mask`` (the causal mask); without a
      ``key_padding_mask`` the kernel applies causal masking itself and the mask is not read.
    * In eval mode with gradients off, ``nn.TransformerEncoderLayer`` may take torch's fused
      inference path, which reads the parameters directly and does not call this module.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None) -> None:
        check_positive_int(_FN, "embed_dim", embed_dim)
        check_positive_int(_FN, "num_heads", num_heads)
        if embed_dim % num_heads:  # torch asserts it
            raise MultiheadAttentionAssertionError(f"{_FN}: embed_dim must be divisible by num_heads, got "
                                                   f"embed_dim={embed_dim} and num_heads={num_heads}")
        if embed_dim // num_heads > functional.MAX_HEAD_DIM:
            raise InputError(f"{_FN}: the head size embed_dim // num_heads must be at most {functional.MAX_HEAD_DIM} "
                             f"(the kernels' limit), got {embed_dim} // {num_heads} = {embed_dim // num_heads}")
        for name, width in (("kdim", kdim), ("vdim", vdim)):
            if width is not None:
                check_positive_int(_FN, name, width)
        check_probability(_FN, "dropout", dropout)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
        if proxy is not None:  # symbolic tracing: record the whole forward as one call
            if proxy.tracer.root is self:
                raise torch.fx.proxy.TraceError(
                    f"{_FN} cannot be the root of a symbolic trace (nor can torch.nn.MultiheadAttention, whose "
                    "forward branches on its inputs); trace a module that contains it: it is recorded as one call")
            return _traced_forward(self, *args)
        if any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value)):
            # torch's fast path takes nested tensors (inference); elsewhere it says why it cannot
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        self._check(query, key, value)
        self._check_masks(query, key, key_padding_mask, attn_mask)
        if need_weights:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=True,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fused(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _check(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """query, key and value, in the order torch checks them, with its exception types: ranks, the
        query's width and key vs value shapes are asserted there, the rest raise RuntimeError."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(_FN, name, t, dtypes=FLOAT_DTYPES)
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise MultiheadAttentionAssertionError(
                f"{_FN}: query, key and value must all be 3-D (batched) or 2-D (unbatched), got {query.dim()}-D, "
                f"{key.dim()}-D, {value.dim()}-D")
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        autocast = _autocast_on(query.device)
        check_same(_FN, ("query", query), ("key", key), ("value", value), dtype=not autocast)
        if query.device != weight.device:
            raise InputError(f"{_FN}: query is on {query.device} but the module's parameters are on "
                             f"{weight.device}; move them to the same device")
        if query.dtype != weight.dtype and not autocast:
            raise InputTypeError(f"{_FN}: query has dtype {query.dtype} but the module's parameters have "
                                 f"{weight.dtype}; they must match (convert the module with .to(dtype), or run under "
                                 "torch.autocast)")
        if query.shape[-1] != self.embed_dim:
            raise MultiheadAttentionAssertionError(
                f"{_FN}: query must have {self.embed_dim} features (last dim), got shape {tuple(query.shape)}")
        # torch asserts key.shape == value.shape with one in_proj_weight, equal length and batch otherwise
        if key.shape[:-1] != value.shape[:-1] or (self._qkv_same_embed_dim and key.shape != value.shape):
            what = "shape" if self._qkv_same_embed_dim else "length and batch"
            raise MultiheadAttentionAssertionError(
                f"{_FN}: key {tuple(key.shape)} and value {tuple(value.shape)} must have the same {what}")
        for name, t, width in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise InputError(f"{_FN}: {name} must have {width} features (last dim), got shape {tuple(t.shape)}")
        if query.dim() == 3:
            bq, bk = (query.shape[0], key.shape[0]) if self.batch_first else (query.shape[1], key.shape[1])
            if bq != bk:
                raise InputError(f"{_FN}: query has batch {bq} but key/value have {bk}")

    def _check_masks(self, query: Tensor, key: Tensor, key_padding_mask: Optional[Tensor],
                     attn_mask: Optional[Tensor]) -> None:
        """The masks' types, dtypes, devices and shapes, by torch's rules, on both paths (so that
        need_weights=True gets the same clear errors as the fused path), each catchable as what torch
        raises: AssertionError for a mask dtype, a key_padding_mask's shape and a mask rank torch
        does not take, RuntimeError for a 2-D or (batched) 3-D attn_mask of the wrong shape."""
        unbatched = query.dim() == 2
        if unbatched:
            n, l_q, l_k = 1, query.shape[0], key.shape[0]
        elif self.batch_first:
            n, l_q, l_k = query.shape[0], query.shape[1], key.shape[1]
        else:
            n, l_q, l_k = query.shape[1], query.shape[0], key.shape[0]
        for name, mask in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
            if mask is None:
                continue
            if not isinstance(mask, Tensor):
                raise InputTypeError(f"{_FN}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise MultiheadAttentionTypeAssertionError(
                    f"{_FN}: {name} must be a bool or float tensor, got {mask.dtype}")
            if mask.device != query.device:
                raise InputError(f"{_FN}: {name} is on {mask.device} but query is on {query.device}; "
                                 "move them to the same device")
        if key_padding_mask is not None:
            want = (l_k,) if unbatched else (n, l_k)
            if tuple(key_padding_mask.shape) != want:
                legend = "(source length,) for an unbatched query" if unbatched else "(batch, source length)"
                raise MultiheadAttentionAssertionError(f"{_FN}: key_padding_mask must have shape {legend} = {want}, "
                                                       f"got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (l_q, l_k):
                    raise InputError(f"{_FN}: a 2-D attn_mask must have shape (target length, source length) = "
                                     f"{(l_q, l_k)}, got {tuple(attn_mask.shape)}")
            elif attn_mask.dim() == 3:
                want = (n * self.num_heads, l_q, l_k)
                lead = "num_heads" if unbatched else "batch * num_heads"
                if tuple(attn_mask.shape) != want:  # torch asserts the unbatched shape, raises for the batched
                    error = MultiheadAttentionAssertionError if unbatched else InputError
                    raise error(f"{_FN}: a 3-D attn_mask must have shape ({lead}, target length, "
                                f"source length) = {want}, got {tuple(attn_mask.shape)}")
            else:
                raise MultiheadAttentionAssertionError(
                    f"{_FN}: attn_mask must be 2-D (target length, source length) or 3-D "
                    f"(batch * num_heads, target length, source length), as in torch, "
                    f"got shape {tuple(attn_mask.shape)}")

    def _projections(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one GEMM
                return F.linear(query, w, b).chunk(3, dim=-1)
            if key is value:
                k, v = F.linear(key, w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
                return F.linear(query, w[:e], bq), k, v
            return F.linear(query, w[:e], bq), F.linear(key, w[e:2 * e], bk), F.linear(value, w[2 * e:], bv)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))

    def _fused(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
               attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True is a hint that attn_mask is the causal mask; "
                               "pass attn_mask too (as torch requires)")
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): one sequence; masks (S,), (L, S) or (heads, L, S)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._projections(query, key, value)          # (L, N, E), (S, N, E), (S, N, E)
        n, h, d = q.shape[1], self.num_heads, self.head_dim
        use_causal = is_causal and key_padding_mask is None      # trust the hint, as torch does
        mask = None if use_causal else _sdpa_mask(attn_mask, q.dtype)
        pad = _sdpa_mask(key_padding_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # shapes checked in _check_masks
            mask = mask.reshape(n, h, *mask.shape[1:])
        if pad is not None:
            pad = pad[:, None, None, :]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, n, -1)])
            v = torch.cat([v, self.bias_v.expand(1, n, -1)])
            mask, pad = _append_key(mask), _append_key(pad)

        def heads(t: Tensor) -> Tensor:  # (len, N, E) -> (N, heads, len, head_dim), a strided view
            return t.view(t.shape[0], n, h, d).permute(1, 2, 0, 3)

        q, k, v = heads(q), heads(k), heads(v)
        if self.add_zero_attn:
            zeros = k.new_zeros(n, h, 1, d)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            mask, pad = _append_key(mask), _append_key(pad)
        if mask is not None and pad is not None:  # one mask: torch merges them the same way
            if mask.dtype == pad.dtype == torch.bool:
                mask = mask & pad
            else:
                mask = _as_float(mask, q.dtype) + _as_float(pad, q.dtype)
        elif pad is not None:
            mask = pad
        with autocast_off(q):  # q, k, v come from the projections, in the autocast dtype under autocast
            out = functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=use_causal)
        l_q = out.shape[2]
        if self.batch_first and not unbatched:
            out = out.transpose(1, 2).reshape(n, l_q, self.embed_dim)
        else:
            out = out.permute(2, 0, 1, 3).reshape(l_q, n, self.embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return out.squeeze(1) if unbatched else out

    @classmethod
    def from_module(cls, m: nn.Module) -> "MultiheadAttention":
        """Wrap a ``torch.nn.MultiheadAttention``: the same parameters and submodules (shared)."""
        if type(m) is not nn.MultiheadAttention:
            raise UnsupportedLayerError(f"expected a torch.nn.MultiheadAttention, got {type(m).__qualname__}")
        if m.head_dim > functional.MAX_HEAD_DIM:
            raise UnsupportedLayerError(f"head size {m.head_dim} is over the kernels' {functional.MAX_HEAD_DIM}")
        new = cls.__new__(cls)
        # own containers (parameter, module and hook tables), shared members: a hook or parameter
        # added to one later does not appear in the other
        new.__dict__.update({k: type(v)(v) if isinstance(v, dict) else v for k, v in m.__dict__.items()})
        return new
