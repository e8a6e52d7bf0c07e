"""Plain-PyTorch references for every attn_fast op: the ground truth the kernels are tested against,
and the CPU path. Imports only torch. Installed as ``attn_fast.reference``."""
from .activations import ACTIVATIONS, GATES, activation_fn, gate_fn
from .attention import CAUSAL_ALIGNMENTS, causal_mask, safe_softmax, scaled_dot_product_attention
from .cbam import SPATIAL_ORDERS, cbam
from .multihead_attention import multi_head_attention
from .rnn_attention import LUONG_SCORES, additive_attention, luong_attention
from .squeeze_excite import POOLS, channel_pool, efficient_channel_attention, squeeze_excite

__all__ = [
    "ACTIVATIONS", "GATES", "activation_fn", "gate_fn",
    "CAUSAL_ALIGNMENTS", "causal_mask", "safe_softmax", "scaled_dot_product_attention",
    "SPATIAL_ORDERS", "cbam",
    "multi_head_attention",
    "LUONG_SCORES", "additive_attention", "luong_attention",
    "POOLS", "channel_pool", "efficient_channel_attention", "squeeze_excite",
]
