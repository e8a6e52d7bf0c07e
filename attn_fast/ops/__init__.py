"""The ops behind the public functions: each picks its path (attn_fast.dispatch) and runs the Triton
kernels or the reference. Inputs arrive validated (attn_fast.functional checks them)."""
from . import attention, attention_cpu, cbam, squeeze_excite  # noqa: E402,F401
