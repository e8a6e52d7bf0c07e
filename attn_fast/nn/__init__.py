"""Drop-in nn.Modules running the fused kernels, with the constructor arguments and state_dict keys
of the layers they replace, and ``from_module(m)`` to wrap an existing layer (sharing its
parameters). ``UnsupportedLayerError`` says why a layer cannot be wrapped."""
from ._layers import UnsupportedLayerError, activation_name
from .cbam import CBAM
from .multihead_attention import (MultiheadAttention, MultiheadAttentionAssertionError,
                                  MultiheadAttentionTypeAssertionError)
from .squeeze_excite import EcaModule, EffectiveSEModule, EfficientNetSqueezeExcite, SEModule, SqueezeExcite
from .vit_attention import VitAttention

__all__ = [
    "MultiheadAttention", "VitAttention", "SqueezeExcite", "SEModule", "EffectiveSEModule", "EfficientNetSqueezeExcite", "EcaModule", "CBAM",
    "UnsupportedLayerError", "activation_name", "MultiheadAttentionAssertionError",
    "MultiheadAttentionTypeAssertionError",
]
