"""pytest-benchmark: scaled-dot-product attention (self, decode, cross), attn_fast against torch SDPA's
backends, FlexAttention, flash_attn and the reference (see bench/conftest.py)."""
import pytest

from bench.conftest import params, run_benchmark

IMPLS = ["attn_fast", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex_attention", "flash_attn",
         "reference"]


@pytest.mark.parametrize("case, dtype, direction, impl", params(["attention", "decode", "cross"], IMPLS))
def test_attention(benchmark, case, dtype, direction, impl):
    run_benchmark(benchmark, case, dtype, direction, impl)
