"""Determinism (issue 8): every op's forward and backward give the same bits run to run, and the
deterministic mode of attention (``deterministic=True`` or ``torch.use_deterministic_algorithms``)
replaces the only order-dependent steps (atomically added mask gradients, timed tile choice).

Under the interpreter programs run one after another, so atomics cannot reorder here: the tests
check that the deterministic mode really takes the atomic-free path (the kernel's MASK_GRAD mode is
recorded at launch) and that its results are still right by the numerics rule. On a GPU the same
tests also compare the bits of repeated runs with atomics in play."""
from __future__ import annotations

import contextlib
import functools
import warnings

import pytest
import torch

import attn_fast
from attn_fast import reference
from attn_fast.kernels import attention_bwd as bwd_module
from attn_fast.kernels import tuning
from numerics import check_op, rand

sdpa = attn_fast.scaled_dot_product_attention
GRADS = ("query", "key", "value")


@contextlib.contextmanager
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def run_twice(fn, inputs, grad):
    """Outputs and the named gradients of two runs of ``fn`` on fresh copies of ``inputs``."""
    results = []
    g = None
    for _ in range(2):
        args = {k: v.detach().clone().requires_grad_(k in grad) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}
        out = fn(**args)
        if g is None:
            g = torch.randn(out.shape, dtype=torch.float64).to(out)
        out.backward(g)
        results.append([out.detach()] + [args[k].grad for k in grad])
    return results


def assert_bitwise(results):
    first, second = results
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.stride() == b.stride()
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def attention_inputs(dtype, mask_shape=None):
    """B 2, Hq 2 sharing one kv head (GQA), Lq 17, Lk 13, E 16, Ev 8."""
    inputs = dict(query=rand(2, 2, 17, 16, dtype=dtype), key=rand(2, 1, 13, 16, dtype=dtype),
                  value=rand(2, 1, 13, 8, dtype=dtype), enable_gqa=True)
    if mask_shape is not None:
        inputs["attn_mask"] = rand(*mask_shape, dtype=dtype)
    return inputs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", ["plain", "causal_mask", "dropout"])
def test_attention_bitwise_reproducible(dtype, variant):
    inputs = attention_inputs(dtype, mask_shape=(1, 2, 17, 13) if variant == "causal_mask" else None)
    grad = GRADS + (("attn_mask",) if "attn_mask" in inputs else ())
    kw = dict(is_causal=variant == "causal_mask", dropout_p=0.3 if variant == "dropout" else 0.0)

    def fn(**args):
        torch.manual_seed(5)  # the dropout seed comes from torch's generator
        return sdpa(**args, **kw)

    assert_bitwise(run_twice(fn, inputs, grad))


def test_squeeze_excite_eca_cbam_bitwise_reproducible():
    x = rand(2, 12, 5, 7, dtype=torch.float16).to(memory_format=torch.channels_last)
    w1, w2 = rand(3, 12, scale=0.3).half(), rand(12, 3, scale=0.3).half()
    b1, b2 = rand(3).half(), rand(12).half()
    se = run_twice(functools.partial(attn_fast.squeeze_excite, pool="avgmax", activation="silu"),
                   dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2),
                   ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))
    assert_bitwise(se)
    eca = run_twice(attn_fast.efficient_channel_attention, dict(x=x, conv_weight=rand(1, 1, 3).half()),
                    ("x", "conv_weight"))
    assert_bitwise(eca)
    cb = run_twice(attn_fast.cbam, dict(x=x, fc1_weight=w1, fc2_weight=w2, conv_weight=rand(1, 2, 7, 7).half(),
                                        fc1_bias=b1, fc2_bias=b2),
                   ("x", "fc1_weight", "fc2_weight", "conv_weight", "fc1_bias", "fc2_bias"))
    assert_bitwise(cb)


@pytest.fixture
def mask_grad_modes(monkeypatch):
    """Records the MASK_GRAD mode of every dK/dV launch."""
    real = bwd_module._attn_bwd_dkdv
    modes = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                modes.append(kwargs["MASK_GRAD"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(bwd_module, "_attn_bwd_dkdv", Spy())
    return modes


# (mask shape, the write mode without deterministic mode): broadcast over batch (atomic adds), over
# query rows (row-summed atomic adds), and no broadcast (plain stores either way)
BROADCAST_MASKS = [((1, 2, 17, 13), bwd_module.MASK_GRAD_ATOMIC), ((2, 1, 1, 13), bwd_module.MASK_GRAD_ROWSUM),
                   ((2, 2, 17, 13), bwd_module.MASK_GRAD_STORE)]


@pytest.mark.parametrize("how", ["argument", "torch_flag"])
@pytest.mark.parametrize("shape,default_mode", BROADCAST_MASKS, ids=lambda v: str(v))
def test_deterministic_mode_avoids_atomics(shape, default_mode, how, mask_grad_modes):
    """Without the mode, a broadcast mask's gradient is added atomically; with it, the kernel only
    stores, and the gradient (summed by torch) still passes the numerics rule against the reference."""
    inputs = attention_inputs(torch.float32, mask_shape=shape)
    run_twice(functools.partial(sdpa, is_causal=True), inputs, GRADS + ("attn_mask",))
    assert mask_grad_modes == [default_mode] * 2
    mask_grad_modes.clear()
    fast = functools.partial(sdpa, deterministic=True) if how == "argument" else sdpa
    with deterministic_algorithms() if how == "torch_flag" else contextlib.nullcontext():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            check_op(fast, reference.scaled_dot_product_attention, {**inputs, "is_causal": True},
                     grad=GRADS + ("attn_mask",))
        assert mask_grad_modes == [bwd_module.MASK_GRAD_STORE]
        assert_bitwise(run_twice(fast, inputs, GRADS + ("attn_mask",)))


def test_torch_flag_is_read_when_the_backward_runs(mask_grad_modes):
    """torch.use_deterministic_algorithms acts at the time an op runs, as in torch: a forward run
    before the flag was set still gets a deterministic backward."""
    inputs = attention_inputs(torch.float32, mask_shape=(1, 2, 17, 13))
    args = {k: v.clone().requires_grad_(k == "attn_mask") if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}
    out = sdpa(**args)
    with deterministic_algorithms():
        out.sum().backward()
    assert mask_grad_modes == [bwd_module.MASK_GRAD_STORE]


@pytest.mark.parametrize("how", ["argument", "torch_flag", "env"])
def test_deterministic_mode_takes_the_first_tile_config(how, monkeypatch):
    """The tile config fixes the order of the sums; deterministic mode never picks one by timing."""
    def timed(fn):
        raise AssertionError("deterministic mode must not time candidates")

    monkeypatch.setattr(tuning, "bench", timed)
    tuning.clear_cache()
    cands = [(64, 64, 4, 3), (128, 64, 8, 3)]
    ran = []
    if how == "env":
        monkeypatch.setenv("ATTN_FAST_AUTOTUNE", "0")
    with deterministic_algorithms() if how == "torch_flag" else contextlib.nullcontext():
        picked = tuning.pick(("k", how), cands, ran.append, deterministic=how == "argument")
    assert picked == cands[0] and not ran and not tuning._CACHE
    assert tuning.enabled(deterministic=True) is False


def test_deterministic_argument_is_checked():
    q = rand(1, 2, 3, 4)
    with pytest.raises(TypeError, match="deterministic"):
        sdpa(q, q, q, deterministic="yes")
    with pytest.raises(TypeError):
        sdpa(q, q, q, None, 0.0, False, None, False, True)  # keyword-only
