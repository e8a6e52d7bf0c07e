"""Concurrency (issue 8): the ops called from several Python threads at once give the same results
as called one at a time. Shared state on the way: the dispatch override and its one-time warnings,
the tile-config cache of kernels/tuning.py, triton's kernel caches (and, under the interpreter, its
interpreted launches), the autograd engine and torch's default generator (dropout seeds)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import attn_fast
from attn_fast.kernels import tuning
from numerics import rand

THREADS = 4


def attention_job(i: int):
    g = torch.Generator().manual_seed(100 + i)
    b, h, lq, lk, e = 1, 1 + i % 2, 9 + 3 * i, 11 + 2 * i, (8, 16, 24, 40)[i % 4]
    q, k, v = (torch.randn(b, h, length, e, generator=g).half().requires_grad_(True)
               for length in (lq, lk, lk))
    out = attn_fast.scaled_dot_product_attention(q, k, v, is_causal=i % 2 == 1)
    out.float().square().sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def channel_job(i: int):
    g = torch.Generator().manual_seed(200 + i)
    c = 8 + 4 * i
    x = torch.randn(2, c, 5, 3 + i, generator=g).requires_grad_(True)
    w1, w2 = (torch.randn(*s, generator=g).mul(0.3).requires_grad_(True) for s in ((4, c), (c, 4)))
    if i % 2:
        y = attn_fast.squeeze_excite(x, w1, None, w2, pool="avgmax")
    else:
        y = attn_fast.cbam(x, w1, w2, torch.randn(1, 2, 3, 3, generator=g).requires_grad_(True))
    y.square().sum().backward()
    return y.detach(), x.grad, w1.grad, w2.grad


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"], ids=["kernels", "reference", "cpu_path"])
@pytest.mark.parametrize("job", [attention_job, channel_job], ids=["attention", "se_cbam"])
def test_threads_give_the_serial_results(job, backend):
    attn_fast.set_backend(backend)
    tuning.clear_cache()
    serial = [job(i) for i in range(THREADS)]
    start = threading.Barrier(THREADS)

    def run(i):
        start.wait()  # all threads enter the op together
        return job(i)

    for _ in range(2):
        with ThreadPoolExecutor(THREADS) as pool:
            parallel = list(pool.map(run, range(THREADS)))
        for one, other in zip(serial, parallel):
            for a, b in zip(one, other):
                assert torch.equal(a, b)


def test_dropout_seeds_differ_per_call_across_threads():
    """Each call draws its own Philox seed under torch's generator lock: two threads never share a
    dropout mask by accident, and the masks are valid (kept values scaled by 1 / (1 - p))."""
    q = rand(1, 1, 16, 16)
    v = torch.eye(16).view(1, 1, 16, 16)
    start = threading.Barrier(THREADS)

    def run(_):
        start.wait()
        return attn_fast.scaled_dot_product_attention(q, q, v, dropout_p=0.5, scale=0.0)

    with ThreadPoolExecutor(THREADS) as pool:
        outs = list(pool.map(run, range(THREADS)))
    for out in outs:  # uniform weights 1/16, kept ones scaled by 2
        assert torch.all((out == 0) | torch.isclose(out, torch.tensor(2 / 16)))
    assert len({out.numpy().tobytes() for out in outs}) == THREADS


def test_backend_override_is_seen_by_all_threads():
    attn_fast.set_backend("reference")
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: attn_fast.dispatch.route(
            "squeeze_excite", torch.device("cpu"), torch.float32).path, range(2)))
    assert paths == ["reference", "reference"]
