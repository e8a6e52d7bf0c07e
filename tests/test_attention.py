"""The fused attention kernels through the public function (interpreted on the CPU, native on a GPU):
outputs and gradients against the float64 reference by the numerics rule, with poisoned outputs."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import attn_fast
from attn_fast import dispatch, reference
from attn_fast.kernels import attention_bwd as bwd_module
from attn_fast.kernels import attention_fwd as fwd_module
from attn_fast.ops.attention import draw_dropout_seed, dropout_keep_mask
from numerics import check_op, rand

sdpa = attn_fast.scaled_dot_product_attention
GRADS = ("query", "key", "value")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel never writes fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(fwd_module.torch, "empty", empty)
    yield


@pytest.fixture(autouse=True)
def kernels_must_run(device):
    """Fail (not fall back) if the kernels are not what runs."""
    r = dispatch.route("scaled_dot_product_attention", device, torch.float16, warn=False)
    assert r.path == "triton", r.reason


def make(b, hq, lq, lk, e, ev=None, hk=None, dtype=torch.float32, device="cpu"):
    hk = hk or hq
    return dict(query=rand(b, hq, lq, e, dtype=dtype, device=device),
                key=rand(b, hk, lk, e, dtype=dtype, device=device),
                value=rand(b, hk, lk, ev or e, dtype=dtype, device=device))


def check_with_dropout(inputs, p, torch_seed, shape, grad):
    """check_op with dropout_p = p: the reference applies the keep-mask the kernels drew, regenerated
    by dropout_keep_mask from the seed torch.manual_seed(torch_seed) leads to."""
    torch.manual_seed(torch_seed)
    keep = dropout_keep_mask(draw_dropout_seed(), shape, p, inputs["query"].device)

    def fast(**kw):
        torch.manual_seed(torch_seed)
        return sdpa(**kw)

    def ref(**kw):
        return reference.scaled_dot_product_attention(**kw, dropout_mask=keep)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return check_op(fast, ref, {**inputs, "dropout_p": p}, grad=grad)


def check(inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the reference
        return check_op(sdpa, reference.scaled_dot_product_attention, {**inputs, **kw}, grad=GRADS)


@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(dtype, device, causal):
    check(make(2, 2, 37, 29, 24, dtype=dtype, device=device), is_causal=causal)


@pytest.mark.parametrize("e,ev", [(1, 1), (8, 8), (16, 40), (72, 72), (80, 48), (96, 96), (160, 24), (256, 256)])
def test_head_sizes(e, ev, device):
    check(make(1, 2, 19, 23, e, ev, device=device, dtype=torch.float16))


@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 53), (53, 1), (17, 41), (41, 17), (64, 64)])
@pytest.mark.parametrize("alignment", ["top_left", "lower_right"])
def test_lengths_and_causal_alignment(lq, lk, alignment, device):
    check(make(1, 2, lq, lk, 16, device=device), is_causal=True, causal_alignment=alignment)


def test_lengths_non_causal(device):
    for lq, lk in [(1, 67), (31, 7), (2, 3)]:
        check(make(2, 1, lq, lk, 32, device=device, dtype=torch.bfloat16))


@pytest.mark.parametrize("shape", [(23, 19), (1, 19), (2, 1, 23, 19), (2, 3, 23, 19), (3, 1, 19), (1, 1, 1, 1)])
def test_bool_mask(shape, device):
    mask = torch.rand(shape, device=device) > 0.4
    check(make(2, 3, 23, 19, 16, device=device), attn_mask=mask)


@pytest.mark.parametrize("shape", [(23, 19), (2, 1, 1, 19), (2, 3, 23, 19)])
def test_float_mask(shape, dtype, device):
    mask = rand(*shape, dtype=dtype, device=device)
    mask[..., 3] = float("-inf")
    check(make(2, 3, 23, 19, 16, dtype=dtype, device=device), attn_mask=mask)


def test_small_blocks_many_iterations(device, monkeypatch):
    """16 x 16 tiles: many key blocks per query block, diagonal blocks, partial blocks at both ends."""
    if device.type == "cuda":
        pytest.skip("on a GPU the tiles come from the candidate tables (gpu_configs)")
    monkeypatch.setattr(fwd_module, "INTERPRETER_CONFIG", (16, 16, 4, 1))
    monkeypatch.setattr(bwd_module, "INTERPRETER_CONFIG", (16, 16, 4, 1))
    for alignment in ("top_left", "lower_right"):
        check(make(1, 2, 45, 70, 16, hk=1, device=device), is_causal=True, causal_alignment=alignment,
              enable_gqa=True)
    check(make(1, 1, 70, 45, 16, device=device), is_causal=True, causal_alignment="lower_right")


def test_mask_with_causal(device):
    mask = torch.rand(2, 1, 20, 30, device=device) > 0.3
    check(make(2, 2, 20, 30, 16, device=device), attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 1), (3, 3)])
def test_gqa(hq, hk, device):
    check(make(2, hq, 21, 18, 16, hk=hk, dtype=torch.float16, device=device), enable_gqa=True, is_causal=True)


def test_scale(device):
    check(make(1, 2, 17, 17, 32, device=device), scale=0.9)


def test_strided_blhe_views(device):
    """(B, L, H, E) tensors viewed as (B, H, L, E) run without copies and give the right answer."""
    b, lq, lk, h, e = 2, 19, 23, 3, 16
    inputs = dict(query=rand(b, lq, h, e, device=device).transpose(1, 2),
                  key=rand(b, lk, h, e, device=device).transpose(1, 2),
                  value=rand(b, lk, h, e, device=device).transpose(1, 2))
    assert not inputs["query"].is_contiguous()
    check(inputs, is_causal=True)


def test_fully_masked_rows_zero_output_and_gradients(device):
    inputs = make(2, 2, 9, 12, 16, device=device)
    mask = torch.rand(2, 2, 9, 12, device=device) > 0.5
    mask[0, 1, 3] = False
    mask[1, :, 7] = False
    check(inputs, attn_mask=mask)
    q = inputs["query"].clone().requires_grad_(True)
    out = sdpa(q, inputs["key"], inputs["value"], mask)
    assert (out[0, 1, 3] == 0).all() and (out[1, :, 7] == 0).all()
    out.backward(torch.randn_like(out))
    assert (q.grad[0, 1, 3] == 0).all() and torch.isfinite(q.grad).all()
    # lower-right causal with Lq > Lk leaves the first rows without keys: zeros as well
    check(make(1, 1, 20, 8, 16, device=device), is_causal=True, causal_alignment="lower_right")


def test_matches_torch_sdpa(device):
    q, k, v = (rand(2, 4, 33, 64, dtype=torch.float16, device=device) for _ in range(3))
    ours = sdpa(q, k, v, is_causal=True)
    theirs = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=2e-3)
    mask = torch.rand(33, 33, device=device) > 0.5
    torch.testing.assert_close(sdpa(q, k, v, mask).float(), F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), mask), rtol=0, atol=2e-3)
    kv = rand(2, 4, 47, 64, dtype=torch.float16, device=device)
    ours = sdpa(q, kv, kv, is_causal=True, causal_alignment="lower_right")
    theirs = F.scaled_dot_product_attention(q.float(), kv.float(), kv.float(), attn_mask=causal_lower_right(33, 47))
    torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=2e-3)


def test_empty_and_unbatched(device):
    q = rand(2, 0, 8, device=device)
    kv = rand(2, 5, 8, device=device)
    assert sdpa(q, kv, kv).shape == (2, 0, 8)
    out = sdpa(kv, rand(2, 0, 8, device=device), rand(2, 0, 8, device=device))
    assert out.shape == (2, 5, 8) and (out == 0).all()
    check(dict(query=rand(3, 6, 16, device=device), key=rand(3, 7, 16, device=device),
               value=rand(3, 7, 16, device=device)))


def test_large_logits_do_not_overflow(device):
    """Scores up to about 1e4 stay finite and accurate. The output meets the numerics rule. Gradients
    are held to fp32's resolution at the magnitude of their terms instead: a row that large is
    one-hot, where the reference's softmax backward cancels exactly (sum(g * p) == g_max) while the
    kernel's delta = rowsum(dO * O), as in every FlashAttention backward, cancels only to rounding:
    |dS| ~ eps * |dO| |V|, which dK carries times scale * |Q|."""
    eps = torch.finfo(torch.float32).eps
    for mult in (30.0, 3000.0):
        inputs = make(1, 1, 16, 16, 16, device=device)
        inputs["query"] = inputs["query"] * mult
        check_op(sdpa, reference.scaled_dot_product_attention, inputs)
        q, k, v = (t.clone().requires_grad_(True) for t in inputs.values())
        g = torch.randn(1, 1, 16, 16, device=device)
        sdpa(q, k, v).backward(g)
        q64, k64, v64 = (t.double().requires_grad_(True) for t in inputs.values())
        reference.scaled_dot_product_attention(q64, k64, v64).backward(g.double())
        terms = 0.25 * q.abs().max() * k.abs().max() * v.abs().max() * g.abs().max() * 16
        for fast, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            assert torch.isfinite(fast).all()
            assert (fast.double() - ref).abs().max() <= 16 * eps * terms + 1e-5


@pytest.mark.parametrize("shape,causal", [((23, 19), False), ((2, 1, 1, 19), True), ((2, 3, 23, 19), True),
                                          ((3, 23, 1), False), ((1, 3, 1, 1), True), ((2, 1, 23, 19), False)])
def test_float_mask_gradient(shape, causal, dtype, device):
    """The gradient of an additive mask comes from the kernels, summed over its broadcast dimensions
    (plain stores, atomic adds and row-summed atomic adds: all three write modes)."""
    mask = rand(*shape, dtype=dtype, device=device)
    inputs = make(2, 3, 23, 19, 16, dtype=dtype, device=device)
    if shape[-1] == 1 and dtype != torch.float32:
        return _check_key_broadcast_mask_gradient(inputs, mask, causal)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check_op(sdpa, reference.scaled_dot_product_attention, {**inputs, "attn_mask": mask, "is_causal": causal},
                 grad=GRADS + ("attn_mask",))


def _check_key_broadcast_mask_gradient(inputs, mask, causal):
    """A mask that is constant along the keys shifts every score of a row alike: softmax ignores it and
    its true gradient is exactly 0. What any kernel returns is the cancellation left in
    sum_j dS_ij = dO_i . O_i - delta_i, which FlashAttention-style backwards compute from the output
    rounded to the input dtype (delta = rowsum(dO * O)): at most the unit roundoff u times
    sum_d |dO_id O_id| per row and broadcast element. The reference cancels within its own rounded
    probabilities instead, so the 2x rule does not apply here (in 16-bit the two noises are alike in
    size, the reference's often smaller). Checked: the bound, and no NaN/inf."""
    m = mask.clone().requires_grad_(True)
    out = sdpa(**inputs, attn_mask=m, is_causal=causal)
    g = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)
    out.backward(g)
    u = torch.finfo(out.dtype).eps / 2
    per_row = (g.double() * out.double()).abs().sum(-1)               # (B, H, Lq)
    bound = 2 * u * per_row.sum_to_size(*m.shape[:-1]).unsqueeze(-1) + 1e-3  # summed like the gradient
    assert torch.isfinite(m.grad).all()
    assert (m.grad.double().abs() <= bound).all(), (m.grad.double().abs() / bound).max()


def test_float_mask_gradient_with_gqa_dropout_and_dead_rows(device):
    inputs = make(2, 4, 21, 26, 16, hk=2, device=device)
    mask = rand(2, 4, 21, 26, device=device)
    mask[0, 1, 5] = float("-inf")  # a dead row: zero output and zero gradients, mask gradient included
    check_with_dropout({**inputs, "attn_mask": mask, "enable_gqa": True}, 0.25, 99, (2, 4, 21, 26),
                       GRADS + ("attn_mask",))
    m = mask.clone().requires_grad_(True)
    sdpa(**inputs, attn_mask=m, enable_gqa=True).sum().backward()
    assert (m.grad[0, 1, 5] == 0).all() and torch.isfinite(m.grad).all()


def test_torch_compile_fullgraph(device):
    def f(q, k, v, m):
        return sdpa(q, k, v, m, is_causal=True).sum()

    inputs = make(1, 2, 17, 17, 16, device=device)
    inputs["mask"] = rand(2, 1, 17, device=device)
    q, k, v, m = (t.clone().requires_grad_(True) for t in inputs.values())
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, m)
    out.backward()
    q2, k2, v2, m2 = (t.clone().requires_grad_(True) for t in inputs.values())
    f(q2, k2, v2, m2).backward()
    torch.testing.assert_close(out, f(*inputs.values()))
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(m.grad, m2.grad)


def test_gradcheck_cpu_path_float64():
    q, k, v = (rand(1, 2, 4, 3, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: sdpa(a, b, c, is_causal=True), (q, k, v))


def test_fake_tensors_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 10, 24)
        k = torch.empty(2, 2, 12, 24)
        v = torch.empty(2, 2, 12, 40)
        out, lse = torch.ops.attn_fast.attention_fwd(q, k, v, None, 0.2, False, 0, False, 0.0, None)
        mask = torch.empty(1, 4, 1, 12)
        grads = torch.ops.attn_fast.attention_bwd(out, q, k, v, out, lse, mask, 0.2, False, 0, False, 0.0, None,
                                                  True)
    assert out.shape == (2, 4, 10, 40) and lse.shape == (2, 4, 10) and lse.dtype == torch.float32
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, mask.shape]


def test_backward_is_deterministic(device):
    inputs = make(1, 4, 33, 33, 16, hk=2, device=device)
    grads = []
    for _ in range(2):
        q, k, v = (t.clone().requires_grad_(True) for t in inputs.values())
        sdpa(q, k, v, enable_gqa=True).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype_case,causal,hk", [(torch.float32, True, 1), (torch.float16, False, 2),
                                                 (torch.bfloat16, True, 2)])
def test_dropout_matches_reference_on_the_kernels_mask(dtype_case, causal, hk, device):
    """Philox dropout in the kernels: outputs and gradients match the reference applying the exact
    keep-mask the kernels drew (regenerated by dropout_keep_mask from the same seed)."""
    inputs = make(2, 2, 37, 29, 16, hk=hk, dtype=dtype_case, device=device)
    check_with_dropout({**inputs, "is_causal": causal, "enable_gqa": True}, 0.3, 1234, (2, 2, 37, 29), GRADS)


def test_dropout_is_reproducible_and_drops_about_p(device):
    inputs = make(1, 2, 64, 64, 16, device=device)
    torch.manual_seed(7)
    a = sdpa(**inputs, dropout_p=0.2)
    torch.manual_seed(7)
    b = sdpa(**inputs, dropout_p=0.2)
    c = sdpa(**inputs, dropout_p=0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    keep = dropout_keep_mask(draw_dropout_seed(), (4, 8, 64, 64), 0.2, device)
    assert abs(keep.float().mean().item() - 0.8) < 0.01
