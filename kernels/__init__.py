"""Triton kernels and their launchers (tensors in, tensors out; no autograd, no input checks).
Installed as ``attn_fast.kernels``; imports only torch and triton.

Each kernel module lists its compile configurations as ``AOT_CASES`` (see ``kernels/aot.py``) and is
named in ``KERNEL_MODULES`` so that ``tests/test_compile.py`` compiles every one of them for sm_80 and
sm_90. Kernel modules are imported on first use, not here, so importing attn_fast does not import
triton.
"""

#: Kernel modules of this package (names relative to it). Kernel issues add theirs.
KERNEL_MODULES = ["attention_fwd", "attention_bwd", "squeeze_excite", "cbam"]
