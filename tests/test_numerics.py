"""The numerics rule itself (attn_fast.numerics and the tests' helper): it passes what it should and
catches what it should."""
import math

import pytest
import torch

from attn_fast.numerics import FLOORS, compare, floor_for
from numerics import assert_close, check_op, poison, rand


def test_rule_passes_within_twice_the_reference_error():
    ref64 = rand(100, dtype=torch.float64)
    ref_lp = ref64.to(torch.bfloat16)
    err_ref = (ref_lp.double() - ref64).abs().max().item()
    fast = (ref64 + 1.9 * err_ref).to(torch.float32)  # within 2x, shifted every element
    r = compare(fast, ref64, ref_lp, dtype=torch.bfloat16)
    assert r.passed and r.err_ref == pytest.approx(err_ref) and r.floor == FLOORS[torch.bfloat16]


def test_rule_fails_beyond_the_bound():
    ref64 = rand(50, dtype=torch.float64)
    ref_lp = ref64.to(torch.float32)
    fast = ref_lp.clone()
    fast[7] += 1e-3
    r = compare(fast, ref64, ref_lp)
    assert not r.passed and r.err_fast == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(AssertionError, match="FAIL"):
        assert_close(fast, ref64, ref_lp)


def test_unwritten_output_is_caught():
    ref64 = rand(4, 4, dtype=torch.float64)
    out = poison(torch.empty(4, 4))
    out[:3] = ref64[:3].float()  # one row never written
    r = compare(out, ref64, ref64.float())
    assert not r.passed and "NaN/inf mismatch" in r.detail


def test_nonfinite_must_match_the_reference():
    ref64 = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    assert compare(ref64.float(), ref64, ref64.float()).passed
    flipped = ref64.float().clone()
    flipped[2] = -float("inf")
    assert not compare(flipped, ref64, ref64.float()).passed


def test_shape_mismatch_fails():
    r = compare(torch.zeros(3), torch.zeros(4, dtype=torch.float64), torch.zeros(4))
    assert not r.passed and "shape" in r.detail


def test_empty_tensors_pass():
    e = torch.empty(0, 3)
    assert compare(e, e.double(), e).passed


def test_floors():
    assert floor_for(torch.float32) == 1e-5
    assert floor_for(torch.float32, tf32=True) > floor_for(torch.float32)
    assert floor_for(torch.float16) == floor_for(torch.bfloat16) == 1e-3
    with pytest.raises(ValueError, match="no numerics floor"):
        floor_for(torch.int32)


def test_check_op_catches_a_wrong_gradient():
    def wrong(x):
        return x.detach() * 2.0 + x * 0.0 + 0.0 * math.pi  # right values, zero gradient

    def right(x):
        return x * 2.0

    x = rand(5, 3)
    check_op(right, right, {"x": x}, grad=("x",))
    with pytest.raises(AssertionError, match="grad x"):
        check_op(wrong, right, {"x": x}, grad=("x",))


def test_bound_is_never_below_one_ulp_of_the_output():
    """A single-number output in bf16: the same-dtype reference landed on the nearest value by luck
    (error 0.004); the neighbour one step away (error 0.0116 < one ulp 0.0156 at 2.23) still passes,
    two steps away does not."""
    ref64 = torch.tensor([-2.2303097645956504], dtype=torch.float64)
    lp = torch.tensor([-2.234375], dtype=torch.bfloat16)
    assert compare(torch.tensor([-2.21875], dtype=torch.bfloat16), ref64, lp).passed
    assert not compare(torch.tensor([-2.203125], dtype=torch.bfloat16), ref64, lp).passed
    assert compare(torch.tensor([-2.21875], dtype=torch.bfloat16), ref64, lp).ulp == 2.0 ** -6
