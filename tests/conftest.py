"""Test harness: the Triton interpreter when there is no GPU, device/dtype fixtures, markers.

The interpreter has to be switched on before triton is imported anywhere, hence at the very top.
"""
import os

import torch  # importing torch does not import triton

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

#: The dtypes the kernels run in; float64 runs the reference.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run tests marked slow (also: ATTN_FAST_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("ATTN_FAST_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow or ATTN_FAST_SLOW=1"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts and ends on the default backend."""
    import attn_fast

    attn_fast.set_backend(None)
    yield
    attn_fast.set_backend(None)


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (kernels run natively), else the CPU (kernels interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=KERNEL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request) -> torch.dtype:
    return request.param
