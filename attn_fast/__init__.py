"""attn_fast: fused Triton kernels for attention layers (scaled dot-product / multi-head attention,
squeeze-and-excitation, CBAM), each validated against a plain PyTorch reference, with a CPU path.

    import attn_fast
    out = attn_fast.scaled_dot_product_attention(q, k, v, is_causal=True)

Subpackages: ``attn_fast.reference`` (the PyTorch definitions, also the CPU path) and
``attn_fast.kernels`` (Triton kernels and launchers), installed from the folders ``reference/`` and
``kernels/`` of the source tree.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Maps ``attn_fast.kernels``/``attn_fast.reference`` to the ``kernels/``/``reference/`` folders
    beside this one, as setup.py's ``package_dir`` does for an installed copy. Used only when this
    package runs from a source tree that has not been installed (say ``python -m pytest`` in a
    fresh checkout): an installed or editable copy finds them by the regular machinery first."""

    def __init__(self, root: str) -> None:
        self.dirs = {f"{__name__}.{sub}": os.path.join(root, sub) for sub in ("kernels", "reference")}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.dirs.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


def _map_source_tree() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.isdir(os.path.join(here, "reference")):  # an installed copy
        return
    if os.path.isfile(os.path.join(root, "reference", "__init__.py")):
        if not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
            sys.meta_path.append(_SourceTreeFinder(root))


_map_source_tree()

from . import dispatch, nn, numerics, ops, reference  # noqa: E402
from ._validate import InputError, InputTypeError  # noqa: E402
from .dispatch import get_backend, set_backend  # noqa: E402
from .functional import (  # noqa: E402
    cbam, efficient_channel_attention, scaled_dot_product_attention, squeeze_excite)
from .convert import ConversionReport, convert  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402

__all__ = [
    "__version__",
    "scaled_dot_product_attention",
    "squeeze_excite",
    "efficient_channel_attention",
    "cbam",
    "convert",
    "verify",
    "ConversionReport",
    "VerifyReport",
    "InputError",
    "InputTypeError",
    "set_backend",
    "get_backend",
    "dispatch",
    "nn",
    "numerics",
    "reference",
]
