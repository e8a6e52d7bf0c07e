"""pytest-benchmark: CBAM layers, attn_fast against timm's CbamModule and the reference (see
bench/conftest.py)."""
import pytest

from bench.conftest import params, run_benchmark

IMPLS = ["attn_fast", "timm", "reference"]


@pytest.mark.parametrize("case, dtype, direction, impl", params(["cbam"], IMPLS))
def test_cbam(benchmark, case, dtype, direction, impl):
    run_benchmark(benchmark, case, dtype, direction, impl)
