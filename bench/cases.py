"""The inputs each op is checked and timed on by the runner: (label, inputs) per op."""
from __future__ import annotations

from typing import Callable, Dict, Iterator, Tuple

import torch

import attn_fast
from attn_fast import reference


def _r(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def attention_cases(dtype) -> Iterator[Tuple[str, Dict]]:
    for b, h, lq, lk, e, causal in [(2, 4, 128, 128, 64, False), (2, 4, 128, 128, 64, True),
                                     (1, 8, 1, 512, 128, False), (2, 2, 77, 200, 80, False)]:
        label = f"B{b} H{h} Lq{lq} Lk{lk} E{e}{' causal' if causal else ''}"
        yield label, dict(query=_r(b, h, lq, e, dtype=dtype), key=_r(b, h, lk, e, dtype=dtype),
                          value=_r(b, h, lk, e, dtype=dtype), is_causal=causal)


def se_cases(dtype) -> Iterator[Tuple[str, Dict]]:
    for n, c, hw, r in [(8, 64, 56, 4), (8, 256, 14, 16), (4, 672, 7, 24)]:
        cr = max(1, c // r)
        yield f"N{n} C{c} {hw}x{hw} Cr{cr}", dict(
            x=_r(n, c, hw, hw, dtype=dtype), fc1_weight=_r(cr, c, dtype=dtype, scale=c ** -0.5),
            fc1_bias=_r(cr, dtype=dtype), fc2_weight=_r(c, cr, dtype=dtype, scale=cr ** -0.5),
            fc2_bias=_r(c, dtype=dtype))


def cbam_cases(dtype) -> Iterator[Tuple[str, Dict]]:
    for n, c, hw, k in [(4, 64, 56, 7), (4, 256, 14, 7), (2, 512, 7, 3)]:
        cr = c // 16
        yield f"N{n} C{c} {hw}x{hw} k{k}", dict(
            x=_r(n, c, hw, hw, dtype=dtype), fc1_weight=_r(cr, c, dtype=dtype, scale=c ** -0.5),
            fc2_weight=_r(c, cr, dtype=dtype, scale=cr ** -0.5), conv_weight=_r(1, 2, k, k, dtype=dtype, scale=0.2))


#: op name -> (public function, reference function, case generator)
OPS: Dict[str, Tuple[Callable, Callable, Callable]] = {
    "scaled_dot_product_attention": (attn_fast.scaled_dot_product_attention,
                                     reference.scaled_dot_product_attention, attention_cases),
    "squeeze_excite": (attn_fast.squeeze_excite, reference.squeeze_excite, se_cases),
    "cbam": (attn_fast.cbam, reference.cbam, cbam_cases),
}
