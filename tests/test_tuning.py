"""The launch-config picker (kernels/tuning.py) and the launchers' use of it: every candidate is timed
once per kind of problem, the fastest is kept, and the timed runs leave no trace in the results."""
import warnings

import pytest
import torch

import attn_fast
from attn_fast import reference
from attn_fast.kernels import attention_bwd as bwd_module
from attn_fast.kernels import attention_fwd as fwd_module
from attn_fast.kernels import tuning
from numerics import check_op, rand


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("ATTN_FAST_AUTOTUNE", raising=False)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


class FakeBench:
    """Stands in for do_bench: runs the launch once and reports a made-up time; the ``best``-th timing
    (counted over all calls, or within each round of ``per_round`` timings) is the fastest."""

    def __init__(self, best, per_round=None):
        self.best, self.per_round, self.calls = best, per_round, []

    def __call__(self, fn):
        self.calls.append(fn)
        fn()
        i = len(self.calls) - 1
        return 1.0 if (i % self.per_round if self.per_round else i) == self.best else 2.0


def test_pick_times_each_candidate_once_per_key(monkeypatch):
    fake = FakeBench(best=1)
    monkeypatch.setattr(tuning, "bench", fake)
    ran = []
    cands = [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2)]
    assert tuning.pick("k1", cands, ran.append) == cands[1]
    assert ran == cands and len(fake.calls) == 3
    assert tuning.pick("k1", cands, ran.append) == cands[1]   # cached: nothing timed again
    assert len(fake.calls) == 3
    fake.best = 5  # a new key is timed afresh; its third run (the sixth timing) is the fastest now
    assert tuning.pick("k2", cands, ran.append) == cands[2] and len(fake.calls) == 6


def test_threads_meeting_a_new_key_time_it_once(monkeypatch):
    """Threads that pick for the same new key at once: the candidates are timed once (not once per
    thread, nor overlapping), and every thread gets the same choice."""
    import threading
    import time

    active, overlaps = [], []

    def slow_bench(fn):
        active.append(1)
        overlaps.append(len(active) > 1)
        time.sleep(0.01)
        fn()
        active.pop()
        return float(len(overlaps))  # the first timing is the fastest

    monkeypatch.setattr(tuning, "bench", slow_bench)
    cands = [(64, 32, 4, 2), (128, 32, 8, 2)]
    start, got = threading.Barrier(4), []

    def worker():
        start.wait()
        got.append(tuning.pick("shared", cands, lambda c: None))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [cands[0]] * 4
    assert len(overlaps) == len(cands) and not any(overlaps)


def test_pick_skips_timing_for_one_candidate_or_when_off(monkeypatch):
    fake = FakeBench(best=1)
    monkeypatch.setattr(tuning, "bench", fake)
    assert tuning.pick("one", [(16, 16, 4, 1)], lambda c: None) == (16, 16, 4, 1)
    monkeypatch.setenv("ATTN_FAST_AUTOTUNE", "0")
    assert tuning.pick("off", [(16, 16, 4, 1), (32, 32, 4, 1)], lambda c: None) == (16, 16, 4, 1)
    assert fake.calls == []


def test_bucket():
    assert [tuning.bucket(n) for n in (0, 1, 16, 17, 1000, 4096)] == [16, 16, 16, 32, 1024, 4096]


def test_launchers_tune_over_their_candidates_and_stay_exact(monkeypatch):
    """The launchers' GPU path (candidates from the config tables, timed by tuning.pick) run under the
    interpreter: every candidate runs during timing, the chosen one gives the result, and the mask
    gradient, accumulated atomically, is not polluted by the timed runs."""
    if torch.cuda.is_available():
        pytest.skip("exercises the GPU launch path on the interpreter; on a GPU every test takes it")
    for mod in (fwd_module, bwd_module):
        monkeypatch.setattr(mod, "interpreting", lambda: False)
        monkeypatch.setattr(mod, "target_cap", lambda device: 90)
    two = {90: {"fp32": {64: [(32, 32, 4, 1), (16, 16, 4, 1)]}, "16bit": {}}}
    monkeypatch.setattr(fwd_module, "FWD_CONFIGS", two)
    monkeypatch.setattr(bwd_module, "DKDV_CONFIGS", two)
    monkeypatch.setattr(bwd_module, "DQ_CONFIGS", two)
    fake = FakeBench(best=1, per_round=2)
    monkeypatch.setattr(tuning, "bench", fake)
    inputs = dict(query=rand(2, 2, 37, 16), key=rand(2, 2, 29, 16), value=rand(2, 2, 29, 16),
                  attn_mask=rand(2, 1, 1, 29), is_causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check_op(attn_fast.scaled_dot_product_attention, reference.scaled_dot_product_attention, inputs,
                 grad=("query", "key", "value", "attn_mask"))
    assert len(fake.calls) == 6  # forward, dK/dV, dQ: two candidates each
    chosen = set(tuning._CACHE.values())
    assert chosen == {(16, 16, 4, 1)} and len(tuning._CACHE) == 3


def test_forced_picks_without_timing_and_rejects_a_stranger(monkeypatch):
    """tuning.forced (the compile gate's way of making each launcher launch one candidate): the named
    kind gets its config, other kinds their first candidate, nothing is timed, and a config that is
    not a candidate is an error; the previous state comes back on exit."""
    monkeypatch.setattr(tuning, "bench", lambda fn: pytest.fail("forced picks must not time anything"))
    monkeypatch.setenv("ATTN_FAST_AUTOTUNE", "1")
    cands = [(64, 32, 4, 2), (128, 64, 8, 2)]
    with tuning.forced({"attn_fwd": (128, 64, 8, 2)}):
        assert tuning.pick(("attn_fwd", "key"), cands, lambda c: None) == (128, 64, 8, 2)
        assert tuning.pick(("attn_bwd_dq", "key"), cands, lambda c: None) == (64, 32, 4, 2)
        with pytest.raises(ValueError, match="not one of its candidates"):
            tuning.pick(("attn_fwd", "other"), [(64, 32, 4, 2)], lambda c: None)
    assert tuning._FORCED is None
