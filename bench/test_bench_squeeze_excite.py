"""pytest-benchmark: squeeze-and-excitation layers, attn_fast against torchvision's and timm's modules
and the reference (see bench/conftest.py)."""
import pytest

from bench.conftest import params, run_benchmark

IMPLS = ["attn_fast", "torchvision", "timm", "reference"]


@pytest.mark.parametrize("case, dtype, direction, impl", params(["se"], IMPLS))
def test_squeeze_excite(benchmark, case, dtype, direction, impl):
    run_benchmark(benchmark, case, dtype, direction, impl)
