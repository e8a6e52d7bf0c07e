"""attn_fast under torch's other machinery (issue 18, items 3-5): forward-mode AD, the torch.func
transforms, torch.compile with inductor, and ``torch.library.opcheck`` of every custom op.

* Forward-mode AD (``torch.func.jvp``/``jacfwd``, ``torch.autograd.forward_ad``) and the torch.func
  transforms (``grad``, ``vmap(grad)``, ``grad`` over ``functional_call``) on calls that would run the
  kernels: the kernels' custom ops have reverse-mode autograd only, so such calls run the reference
  (``attn_fast.dispatch.autograd_unsupported``). Each result is checked against the same transform
  of the reference, in float64 and in the input dtype, by the numerics rule.
* torch.compile with the default backend (inductor: it asserts the strides the fake
  implementations promise) through fwd+bwd on strided inputs, and opcheck of every op on strided,
  permuted, broadcast (stride-0) and transposed inputs.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import attn_fast
from attn_fast import dispatch, reference
from attn_fast.ops import attention as attention_ops
from attn_fast.ops import cbam as cbam_ops
from attn_fast.ops import squeeze_excite as se_ops
from numerics import assert_close, rand

F32, F64 = torch.float32, torch.float64

#: The one-time fallback warnings these tests provoke on purpose (one test checks them).
pytestmark = pytest.mark.filterwarnings(
    "ignore:attn_fast. the .* kernel does not cover (forward-mode AD|torch.func transforms):RuntimeWarning")


@pytest.fixture(autouse=True)
def kernels_would_run(device):
    """Every call here would run the kernels (natively or interpreted) but for the transform."""
    for op in dispatch.OPS:
        r = dispatch.route(op, device, F32, warn=False)
        assert r.path == "triton", r.reason


# ---------------------------------------------------------------------------------------------
# The ops, as (fast, reference, inputs, differentiable inputs)
# ---------------------------------------------------------------------------------------------

def _group_norm(cr: int, device) -> nn.GroupNorm:
    """A norm layer for SE's hidden layer (timm SEModule's ``norm_layer``) that is not a BatchNorm
    in eval mode, so the SE op runs through channel_pool / channel_scale (fp32, random affine)."""
    norm = nn.GroupNorm(1, cr).to(device)
    with torch.no_grad():
        norm.weight.copy_(rand(cr) + 1.0)
        norm.bias.copy_(rand(cr))
    return norm


@dataclass
class Case:
    name: str
    fast: Callable
    ref: Callable
    inputs: Dict[str, object]
    diff: Tuple[str, ...]
    batched: Tuple[str, ...]          # the inputs with a batch dim (dim 0) that vmap maps over
    options: Dict[str, object] = field(default_factory=dict)
    norm: Optional[nn.Module] = None  # SE's norm layer: copied to each run's dtype

    def args(self, dtype: torch.dtype) -> Dict[str, object]:
        """The inputs in ``dtype`` (floating tensors), fresh leaves, with the options."""
        out = {k: v.detach().to(dtype).clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
               for k, v in self.inputs.items()}
        if self.norm is not None:
            out["norm"] = copy.deepcopy(self.norm).to(dtype)
        return {**out, **self.options}


def make_cases(device) -> Dict[str, Case]:
    p = dict(device=device)
    b, h, lq, lk, e = 2, 2, 5, 4, 8
    attn = Case("attention", attn_fast.scaled_dot_product_attention, reference.scaled_dot_product_attention,
                dict(query=rand(b, h, lq, e, **p), key=rand(b, h, lk, e, **p), value=rand(b, h, lk, e, **p),
                     attn_mask=rand(lq, lk, **p)),
                ("query", "key", "value", "attn_mask"), ("query", "key", "value"),
                dict(is_causal=True, causal_alignment="lower_right"))
    n, c, hh, ww, cr = 2, 8, 3, 3, 2
    se_in = dict(x=rand(n, c, hh, ww, **p), fc1_weight=rand(cr, c, scale=0.3, **p), fc1_bias=rand(cr, **p),
                 fc2_weight=rand(c, cr, scale=0.3, **p), fc2_bias=rand(c, **p))
    se_diff = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    se = Case("squeeze_excite", attn_fast.squeeze_excite, reference.squeeze_excite, se_in, se_diff, ("x",),
              dict(activation="silu", pool="avgmax"))
    se_norm = Case("squeeze_excite_norm", attn_fast.squeeze_excite, reference.squeeze_excite, dict(se_in), se_diff,
                   ("x",), dict(activation="relu"), norm=_group_norm(cr, device))
    eca = Case("eca", attn_fast.efficient_channel_attention, reference.efficient_channel_attention,
               dict(x=rand(n, c, hh, ww, **p), conv_weight=rand(3, **p)), ("x", "conv_weight"), ("x",))
    cb_in = dict(x=rand(n, c, hh, ww, **p), fc1_weight=rand(cr, c, scale=0.3, **p),
                 fc2_weight=rand(c, cr, scale=0.3, **p), conv_weight=rand(1, 2, 3, 3, scale=0.3, **p),
                 fc1_bias=rand(cr, **p), conv_bias=rand(1, **p), bn_weight=rand(1, **p) + 1.0, bn_bias=rand(1, **p))
    cbam = Case("cbam", attn_fast.cbam, reference.cbam, cb_in, tuple(cb_in), ("x",),
                dict(bn_training=True, activation="silu"))  # batch statistics, no running ones to update
    return {case.name: case for case in (attn, se, se_norm, eca, cbam)}


CASE_NAMES = ("attention", "squeeze_excite", "squeeze_excite_norm", "eca", "cbam")


def _bind(fn: Callable, args: Dict[str, object], names) -> Callable:
    """fn as a function of the inputs called ``names`` (positional), the rest fixed."""
    def call(*values):
        return fn(**{**args, **dict(zip(names, values))})
    return call


def _tangents(case: Case) -> Dict[str, torch.Tensor]:
    return {k: rand(*case.inputs[k].shape, device=case.inputs[k].device) for k in case.diff}


def _check_all(fast, ref64, ref_lp, label: str) -> None:
    fast, ref64, ref_lp = (t if isinstance(t, (tuple, list)) else (t,) for t in (fast, ref64, ref_lp))
    assert len(fast) == len(ref64) == len(ref_lp)
    for i, (f, r64, rlp) in enumerate(zip(fast, ref64, ref_lp)):
        assert_close(f, r64, rlp, f"{label} {i}")


# ---------------------------------------------------------------------------------------------
# Item 3: forward-mode AD gives the reference's tangents, never zeros
# ---------------------------------------------------------------------------------------------

def _jvp(case: Case, fn: Callable, dtype: torch.dtype, tangents):
    args = case.args(dtype)
    primals = tuple(args[k] for k in case.diff)
    return torch.func.jvp(_bind(fn, args, case.diff), primals, tuple(tangents[k].to(dtype) for k in case.diff))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_func_jvp_matches_reference(name, device):
    case = make_cases(device)[name]
    tangents = _tangents(case)
    (out, tan), (out64, tan64), (out_lp, tan_lp) = (
        _jvp(case, fn, dtype, tangents) for fn, dtype in ((case.fast, F32), (case.ref, F64), (case.ref, F32)))
    assert tan64.abs().max() > 0
    assert_close(out, out64, out_lp, "output")
    assert_close(tan, tan64, tan_lp, "tangent")


def _forward_ad(case: Case, fn: Callable, dtype: torch.dtype, tangents):
    args = case.args(dtype)
    with fwAD.dual_level():
        duals = {k: fwAD.make_dual(args[k], tangents[k].to(dtype)) for k in case.diff}
        out = fwAD.unpack_dual(fn(**{**args, **duals}))
        assert out.tangent is not None, "no tangent"
        return out.primal.detach(), out.tangent.detach()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_forward_ad_dual_tensors_match_reference(name, device):
    case = make_cases(device)[name]
    tangents = _tangents(case)
    (out, tan), (out64, tan64), (out_lp, tan_lp) = (
        _forward_ad(case, fn, dtype, tangents) for fn, dtype in ((case.fast, F32), (case.ref, F64), (case.ref, F32)))
    assert_close(out, out64, out_lp, "output")
    assert_close(tan, tan64, tan_lp, "tangent")


@pytest.mark.parametrize("transform", ["jacfwd", "jacrev"])
def test_attention_jacobian_matches_reference(transform, device):
    case = make_cases(device)["attention"]
    jac = getattr(torch.func, transform)
    names = ("query", "attn_mask")

    def run(fn, dtype):
        args = case.args(dtype)
        return jac(_bind(fn, args, names), argnums=(0, 1))(*(args[k] for k in names))

    _check_all(run(case.fast, F32), run(case.ref, F64), run(case.ref, F32), transform)


def test_se_forward_ad_tangent_from_the_norm_alone(device):
    """A tangent that enters only through the norm layer (a plain callable closing over a dual
    parameter, which the dispatch cannot see) reaches the output: the channel scaling, the one step
    after the norm, then runs in torch."""
    case = make_cases(device)["squeeze_excite_norm"]
    cr = case.inputs["fc1_weight"].shape[0]
    weight, tangent = rand(cr, device=device) + 1.0, rand(cr, device=device)

    def run(fn, dtype):
        args = case.args(dtype)
        del args["norm"]
        with fwAD.dual_level():
            w = fwAD.make_dual(weight.to(dtype), tangent.to(dtype))
            norm = lambda t: torch.nn.functional.group_norm(t, 1, w)  # noqa: E731
            out = fwAD.unpack_dual(fn(**args, norm=norm))
            assert out.tangent is not None, "no tangent"
            return out.primal.detach(), out.tangent.detach()

    (out, tan), (out64, tan64), (out_lp, tan_lp) = (
        run(fn, dtype) for fn, dtype in ((case.fast, F32), (case.ref, F64), (case.ref, F32)))
    assert tan64.abs().max() > 0
    assert_close(out, out64, out_lp, "output")
    assert_close(tan, tan64, tan_lp, "tangent")


# ---------------------------------------------------------------------------------------------
# Item 5: torch.func.grad, vmap(grad) per-sample gradients, grad over functional_call
# ---------------------------------------------------------------------------------------------

def _weights_for(case: Case) -> torch.Tensor:
    """A fixed random output weighting, so the gradient of the loss is not a special one."""
    out = case.ref(**case.args(F64))
    return rand(*out.shape, device=out.device)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_func_grad_matches_reference(name, device):
    case = make_cases(device)[name]
    w = _weights_for(case)

    def run(fn, dtype):
        args = case.args(dtype)
        f = _bind(fn, args, case.diff)
        loss = lambda *v: (f(*v) * w.to(dtype)).sum()  # noqa: E731
        return torch.func.grad(loss, argnums=tuple(range(len(case.diff))))(*(args[k] for k in case.diff))

    _check_all(run(case.fast, F32), run(case.ref, F64), run(case.ref, F32), "grad")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_vmap_grad_per_sample_gradients_match_reference(name, device):
    """Per-sample gradients of every input: vmap over the batch of the batched inputs (each sample
    keeps a batch dim of one), the rest shared."""
    case = make_cases(device)[name]
    w = _weights_for(case)
    names = case.batched + tuple(k for k in case.diff if k not in case.batched)
    in_dims = tuple(0 if k in case.batched else None for k in names)

    def run(fn, dtype):
        args = case.args(dtype)

        def loss(*values):
            one = dict(zip(names, values))
            one.update({k: one[k].unsqueeze(0) for k in case.batched})
            return (fn(**{**args, **one}) * w[:1].to(dtype)).sum()

        return torch.func.vmap(torch.func.grad(loss, argnums=tuple(range(len(names)))), in_dims=in_dims)(
            *(args[k] for k in names))

    fast = run(case.fast, F32)
    assert fast[0].shape == case.inputs[names[0]].shape
    _check_all(fast, run(case.ref, F64), run(case.ref, F32), "per-sample grad")


def _modules(device):
    """name -> (module, call, x): ``call(m, x)`` runs the module's forward on x, with ``m`` the module
    or a stand-in for it (functional_call with swapped parameters)."""
    torch.manual_seed(1)
    mha = attn_fast.nn.MultiheadAttention(16, 2, batch_first=True)
    se = attn_fast.nn.SEModule(8, rd_channels=2, norm_layer=lambda c, **dd: nn.GroupNorm(1, c, **dd))
    eca = attn_fast.nn.EcaModule(kernel_size=3)
    cbam = attn_fast.nn.CBAM(8, rd_channels=2, spatial_kernel_size=3).eval()  # BatchNorm on running stats
    with torch.no_grad():  # nothing special about the default init (zero biases, unit norms)
        for m in (mha, se, cbam):
            for p in m.parameters():
                p.add_(0.1 * rand(*p.shape))
        cbam.spatial.conv.bn.running_mean.fill_(0.2)
        cbam.spatial.conv.bn.running_var.fill_(1.5)
    mask = rand(5, 6)

    def mha_call(m, x):  # x (N, 5 + 6, 16): queries and keys/values from separate halves
        q, kv = x[:, :5], x[:, 5:]
        return m(q, kv, kv, attn_mask=mask.to(x), need_weights=False)[0]

    return {
        "MultiheadAttention": (mha, mha_call, rand(2, 11, 16)),
        "SEModule_norm": (se, lambda m, x: m(x), rand(2, 8, 3, 3)),
        "EcaModule": (eca, lambda m, x: m(x), rand(2, 8, 3, 3)),
        "CBAM": (cbam, lambda m, x: m(x), rand(2, 8, 3, 3)),
    }


@pytest.mark.parametrize("name", ["MultiheadAttention", "SEModule_norm", "EcaModule", "CBAM"])
def test_grad_over_functional_call_of_a_module(name, device):
    """grad and per-sample grads (vmap(grad)) of a module's parameters through functional_call,
    against the module on the reference (``set_backend("reference")``), float64 and float32."""
    module, call, x = _modules(device)[name]
    module, x = module.to(device), x.to(device)
    w = rand(*call(module, x).shape, device=device)

    def run(dtype, backend):
        m = copy.deepcopy(module).to(dtype)
        params = {k: v.detach() for k, v in m.named_parameters()}
        xd = x.to(dtype)

        def loss(p, xs):
            swapped = lambda *a, **k: torch.func.functional_call(m, p, a, k)  # noqa: E731
            return (call(swapped, xs) * w[:xs.shape[0]].to(dtype)).sum()

        attn_fast.set_backend(backend)
        try:
            full = torch.func.grad(loss)(params, xd)
            per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(
                params, xd.unsqueeze(1))  # each sample (1, ...)
        finally:
            attn_fast.set_backend(None)
        return full, per_sample

    (g, ps), (g64, ps64), (g_lp, ps_lp) = run(F32, None), run(F64, "reference"), run(F32, "reference")
    for k in g:
        assert_close(g[k], g64[k], g_lp[k], f"grad {k}")
        assert ps[k].shape == (x.shape[0], *g[k].shape)
        assert_close(ps[k], ps64[k], ps_lp[k], f"per-sample grad {k}")


def test_transforms_route_to_the_reference_and_warn_once(device, monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    q = rand(1, 2, 3, 8, device=device)
    assert dispatch.autograd_unsupported((q,)) is None
    with fwAD.dual_level():
        assert dispatch.autograd_unsupported((q,)) is None  # no tangent: the kernels still run
        assert dispatch.route("cbam", q.device, q.dtype, tensors=(q,)).path == "triton"
        dual = fwAD.make_dual(q, torch.ones_like(q))
        assert dispatch.autograd_unsupported((None, q, dual)) == dispatch.FORWARD_AD
        with pytest.warns(RuntimeWarning, match="forward-mode AD"):
            r = dispatch.route("cbam", q.device, q.dtype, tensors=(dual,))
        assert r.path == "reference" and "forward-mode AD" in r.reason
    seen = []
    torch.func.grad(lambda t: seen.append(dispatch.autograd_unsupported()) or t.sum())(q)
    assert seen == [dispatch.FUNC_TRANSFORMS]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.func.grad(lambda t: attn_fast.scaled_dot_product_attention(t, t, t).sum())(q)
    messages = [str(w.message) for w in caught if "attn_fast" in str(w.message)]
    assert len(messages) == 1 and "torch.func transforms" in messages[0], messages


# ---------------------------------------------------------------------------------------------
# Item 4: torch.compile with inductor (the default backend), fwd + bwd on strided inputs
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_compile():
    """No FX graph or AOT autograd cache (a graph cached before a fake changed would hide it), no
    graphs from earlier tests."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def _compiled_matches_eager(fn, inputs):
    """fn compiled (default backend, fullgraph) against fn in eager: output and every gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = torch.compile(fn, fullgraph=True)(*leaves)
    out.backward()
    eager = [t.detach().clone().requires_grad_(True) for t in inputs]
    want = fn(*eager)
    want.backward()
    torch.testing.assert_close(out, want)
    for i, (a, b) in enumerate(zip(leaves, eager)):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"grad {i}: {m}")


def test_inductor_multihead_attention_fwd_bwd(device, fresh_compile):
    """A converted MultiheadAttention (batch_first, cross-attention, float mask): q, k, v reach the
    op as transposed (B, H, L, E) views of the projections; attention_bwd's dq/dk/dv are contiguous."""
    torch.manual_seed(0)
    m = attn_fast.nn.MultiheadAttention(16, 2, batch_first=True).to(device)
    mask = rand(5, 6, device=device)
    names = [k for k, _ in m.named_parameters()]

    def fn(q, kv, *params):
        out = torch.func.functional_call(m, dict(zip(names, params)), (q, kv, kv),
                                         dict(attn_mask=mask, need_weights=False))[0]
        return out.square().sum()

    _compiled_matches_eager(fn, [rand(2, 5, 16, device=device), rand(2, 6, 16, device=device),
                                 *(p.detach() for p in m.parameters())])


def test_inductor_channel_attention_fwd_bwd(device, fresh_compile):
    """SE (fused, and with a norm layer: channel_pool/channel_scale), ECA and CBAM in one graph, on a
    permuted x (dense, neither NCHW nor channels_last: the ops copy it to NCHW) with transposed fc
    weights (their gradients come back contiguous)."""
    n, c, hh, ww, cr = 2, 8, 3, 4, 2
    norm = _group_norm(cr, device)

    def fn(x, w1, w2, conv1d, cw1, cw2, conv2d, bn_w):
        x = x.transpose(0, 1)               # (C, N, H, W) storage: a permuted (N, C, H, W)
        w1, w2 = w1.t(), w2.t()             # (Cr, C) and (C, Cr) as transposed views
        y = attn_fast.squeeze_excite(x, w1, None, w2, None, activation="silu", pool="avgmax")
        y = y + attn_fast.squeeze_excite(x, w1, None, w2, None, norm=norm)
        y = y + attn_fast.efficient_channel_attention(x, conv1d)
        y = y + attn_fast.cbam(x, cw1.t(), cw2.t(), conv2d, bn_weight=bn_w, bn_training=True)
        return y.square().sum()

    p = dict(device=device)
    _compiled_matches_eager(fn, [rand(c, n, hh, ww, **p), rand(c, cr, scale=0.3, **p), rand(cr, c, scale=0.3, **p),
                                 rand(3, **p), rand(c, cr, scale=0.3, **p), rand(cr, c, scale=0.3, **p),
                                 rand(1, 2, 3, 3, scale=0.3, **p), rand(1, **p) + 1.0])


def test_compiled_attention_under_forward_ad_and_func_grad(device, fresh_compile):
    """A compiled function (aot_eager: no C++ compile) called under forward-mode AD and under
    torch.func.grad, and torch.func.grad compiled itself: the transform checks stay on while dynamo
    traces, so no tangent or gradient is dropped."""
    case = make_cases(device)["attention"]
    q, t = case.inputs["query"], _tangents(case)["query"]
    w = _weights_for(case)

    def f_of(fn, dtype):
        args = case.args(dtype)
        return lambda q: fn(**{**args, "query": q})

    compiled = torch.compile(f_of(case.fast, F32), backend="aot_eager")
    torch.testing.assert_close(compiled(q), f_of(case.fast, F32)(q))  # the kernels, traced first
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(compiled(fwAD.make_dual(q, t))).tangent
    assert tangent is not None, "no tangent"
    refs = [torch.func.jvp(f_of(case.ref, dtype), (q.to(dtype),), (t.to(dtype),))[1] for dtype in (F64, F32)]
    assert_close(tangent, *refs, "tangent")

    def loss_of(fn, dtype):
        return lambda q: (fn(q) * w.to(dtype)).sum()

    refs = [torch.func.grad(loss_of(f_of(case.ref, dtype), dtype))(q.to(dtype)) for dtype in (F64, F32)]
    assert_close(torch.func.grad(loss_of(compiled, F32))(q), *refs, "grad of a compiled function")
    compiled_grad = torch.compile(torch.func.grad(loss_of(f_of(case.fast, F32), F32)), backend="aot_eager")
    assert_close(compiled_grad(q), *refs, "compiled grad")
    # fullgraph too: the one-time fallback warning is skipped while dynamo traces (it cannot enter
    # the warning's lock; the eager calls above warned)
    whole = torch.compile(torch.func.grad(loss_of(f_of(case.fast, F32), F32)), backend="aot_eager", fullgraph=True)
    assert_close(whole(q), *refs, "compiled grad, fullgraph")


# ---------------------------------------------------------------------------------------------
# Item 4: opcheck of every custom op on strided, permuted, broadcast and transposed inputs
# ---------------------------------------------------------------------------------------------

N, C, H, W, CR = 2, 4, 3, 5, 2


def _x(layout: str, device, n=N, c=C, h=H, w=W) -> torch.Tensor:
    make = {
        "nchw": lambda: rand(n, c, h, w, device=device),
        "channels_last": lambda: rand(n, h, w, c, device=device).permute(0, 3, 1, 2),
        "permuted": lambda: rand(c, n, h, w, device=device).transpose(0, 1),      # dense, neither format
        "hw_transposed": lambda: rand(n, c, w, h, device=device).transpose(2, 3),  # dense, neither format
        "sliced": lambda: rand(n, c, h, 2 * w, device=device)[..., ::2],
        "broadcast": lambda: rand(1, c, h, w, device=device).expand(n, c, h, w),  # stride 0
    }
    return make[layout]()


def _w(o: int, i: int, transposed: bool, device) -> torch.Tensor:
    return rand(i, o, device=device).t() if transposed else rand(o, i, device=device)


def _grad(t):
    return None if t is None else t.detach().requires_grad_(True)


def _plain(args):
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def _se_args(layout, transposed, pool, device):
    return [_grad(_x(layout, device)), _grad(_w(CR, C, transposed, device)), _grad(rand(CR, device=device)),
            _grad(_w(C, CR, transposed, device)), _grad(rand(C, device=device)), "relu", "sigmoid", pool]


def _se_bwd_args(layout, dy_layout, transposed, pool, device):
    fwd = _plain(_se_args(layout, transposed, pool, device))
    outs = se_ops.se_fwd(*fwd)
    return [_x(dy_layout, device), *fwd[:5], *outs[1:], *fwd[5:]]


def _eca_bwd_args(layout, dy_layout, device):
    x, w = _x(layout, device), rand(3, device=device)
    _, z, pre, s = se_ops.eca_fwd(x, w, "sigmoid")
    return [_x(dy_layout, device), x, w, z, pre, s, "sigmoid"]


def _pool_bwd_args(layout, pool, dz_transposed, device):
    x = _x(layout, device)
    _, zmax = se_ops.channel_pool_op(x, pool)
    dz = rand(C, N, device=device).t() if dz_transposed else rand(N, C, device=device)
    return [dz, x, zmax, pool]


def _s(transposed, device):
    return rand(C, N, device=device).t() if transposed else rand(N, C, device=device)


def _cbam_args(layout, transposed, light, bn, device):
    x = _x(layout, device)
    opt = lambda t: _grad(t) if bn else None  # noqa: E731
    return [_grad(x), _grad(_w(CR, C, transposed, device)), _grad(rand(CR, device=device)),
            _grad(_w(C, CR, transposed, device)), None, _grad(rand(1, 1 if light else 2, 3, 3, device=device)),
            _grad(rand(1, device=device)), opt(rand(1, device=device) + 1.0), opt(rand(1, device=device)),
            None, None, "relu", "sigmoid", "sigmoid", light, "mean_max", bn, bn, 1e-5]


def _cbam_bwd_args(layout, dy_layout, transposed, light, bn, device):
    fwd = _plain(_cbam_args(layout, transposed, light, bn, device))
    outs = cbam_ops.cbam_fwd(*fwd)
    return [_x(dy_layout, device), *fwd[:9], *outs[1:], *fwd[11:18]]


B, HQ, LQ, LK, E = 2, 2, 5, 4, 8


def _qkv(layout: str, length: int, device) -> torch.Tensor:
    if layout == "transposed":  # (B, L, H, E) projections viewed as (B, H, L, E), as MultiheadAttention does
        return rand(B, length, HQ, E, device=device).transpose(1, 2)
    if layout == "broadcast":   # one head expanded over the heads (stride 0)
        return rand(B, 1, length, E, device=device).expand(B, HQ, length, E)
    return rand(B, HQ, length, E, device=device)


def _mask(kind: str, device):
    return {
        "none": None,
        "bool": rand(LQ, LK, device=device)[None, None] > -0.5,
        "float_broadcast": rand(1, 1, LQ, LK, device=device).expand(B, HQ, LQ, LK),  # stride 0
        "float_row": rand(1, 1, 1, LK, device=device),
        "float_transposed": rand(B, HQ, LK, LQ, device=device).transpose(-1, -2),
    }[kind]


def _attn_args(layout, mask, causal, device, dropout=0.0):
    m = _mask(mask, device)
    seed = torch.tensor([1234]) if dropout else None
    return [_grad(_qkv(layout, LQ, device)), _grad(_qkv(layout, LK, device)), _grad(_qkv(layout, LK, device)),
            _grad(m) if m is not None and m.is_floating_point() else m, 0.35, causal, LK - LQ, False, dropout, seed,
            False]


def _attn_bwd_args(layout, mask, causal, mask_grad, device):
    fwd = _plain(_attn_args(layout, mask, causal, device))
    out, lse = attention_ops.attention_fwd(*fwd)
    return [_qkv(layout, LQ, device), *fwd[:3], out, lse, *fwd[3:10], mask_grad, False]


#: (id, op name, args builder): every op, on layouts whose outputs the fake must describe exactly.
OPCHECK_CASES = [
    ("attention_fwd-transposed-float_broadcast-causal", "attention_fwd",
     lambda d: _attn_args("transposed", "float_broadcast", True, d)),
    ("attention_fwd-broadcast-bool", "attention_fwd", lambda d: _attn_args("broadcast", "bool", False, d)),
    ("attention_fwd-transposed-dropout", "attention_fwd",
     lambda d: _attn_args("transposed", "none", False, d, dropout=0.25)),
    ("attention_bwd-transposed", "attention_bwd", lambda d: _attn_bwd_args("transposed", "none", True, False, d)),
    ("attention_bwd-transposed-float_row-mask_grad", "attention_bwd",
     lambda d: _attn_bwd_args("transposed", "float_row", False, True, d)),
    ("attention_bwd-broadcast-float_transposed-mask_grad", "attention_bwd",
     lambda d: _attn_bwd_args("broadcast", "float_transposed", True, True, d)),
    ("attention_bwd-contiguous-bool-mask_grad", "attention_bwd",  # no gradient for a bool mask
     lambda d: _attn_bwd_args("contiguous", "bool", False, True, d)),
    ("se_fwd-permuted-transposed_w-avgmax", "se_fwd", lambda d: _se_args("permuted", True, "avgmax", d)),
    ("se_fwd-broadcast", "se_fwd", lambda d: _se_args("broadcast", False, "avg", d)),
    ("se_fwd-sliced", "se_fwd", lambda d: _se_args("sliced", False, "avgmax", d)),
    ("se_bwd-permuted-transposed_w", "se_bwd",
     lambda d: _se_bwd_args("permuted", "permuted", True, "avgmax", d)),
    ("se_bwd-channels_last-dy_nchw-transposed_w", "se_bwd",
     lambda d: _se_bwd_args("channels_last", "nchw", True, "avg", d)),
    ("se_bwd-broadcast", "se_bwd", lambda d: _se_bwd_args("broadcast", "broadcast", False, "avgmax", d)),
    ("eca_fwd-hw_transposed", "eca_fwd", lambda d: [_grad(_x("hw_transposed", d)), _grad(rand(3, device=d)),
                                                     "sigmoid"]),
    ("eca_fwd-broadcast", "eca_fwd", lambda d: [_grad(_x("broadcast", d)), _grad(rand(1, 1, 3, device=d)),
                                                 "hardsigmoid"]),
    ("eca_bwd-permuted-dy_sliced", "eca_bwd", lambda d: _eca_bwd_args("permuted", "sliced", d)),
    ("channel_pool-permuted-avgmax", "channel_pool", lambda d: [_grad(_x("permuted", d)), "avgmax"]),
    ("channel_pool-broadcast", "channel_pool", lambda d: [_grad(_x("broadcast", d)), "avg"]),
    ("channel_pool_bwd-permuted-avgmax", "channel_pool_bwd", lambda d: _pool_bwd_args("permuted", "avgmax", True, d)),
    ("channel_pool_bwd-sliced", "channel_pool_bwd", lambda d: _pool_bwd_args("sliced", "avg", False, d)),
    ("channel_scale-hw_transposed-s_transposed", "channel_scale",
     lambda d: [_grad(_x("hw_transposed", d)), _grad(_s(True, d))]),
    ("channel_scale-broadcast", "channel_scale", lambda d: [_grad(_x("broadcast", d)), _grad(_s(False, d))]),
    ("channel_scale_bwd-permuted-s_transposed", "channel_scale_bwd",
     lambda d: [_x("nchw", d), _x("permuted", d), _s(True, d)]),
    ("channel_scale_bwd-channels_last-s_transposed", "channel_scale_bwd",
     lambda d: [_x("permuted", d), _x("channels_last", d), _s(True, d)]),
    ("cbam_fwd-permuted-transposed_w-bn", "cbam_fwd", lambda d: _cbam_args("permuted", True, False, True, d)),
    ("cbam_fwd-broadcast-light", "cbam_fwd", lambda d: _cbam_args("broadcast", False, True, False, d)),
    ("cbam_bwd-permuted-transposed_w-bn", "cbam_bwd",
     lambda d: _cbam_bwd_args("permuted", "nchw", True, False, True, d)),
    ("cbam_bwd-channels_last-transposed_w-light", "cbam_bwd",
     lambda d: _cbam_bwd_args("channels_last", "permuted", True, True, False, d)),
    ("cbam_bwd-broadcast", "cbam_bwd", lambda d: _cbam_bwd_args("broadcast", "broadcast", False, False, True, d)),
]


def _registered_ops():
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("attn_fast::"))


def test_opcheck_cases_cover_every_registered_op():
    assert set(_registered_ops()) == {op for _, op, _ in OPCHECK_CASES}


@pytest.mark.parametrize("op,build", [pytest.param(op, build, id=cid) for cid, op, build in OPCHECK_CASES])
def test_opcheck(op, build, device):
    torch.library.opcheck(getattr(torch.ops.attn_fast, op).default, tuple(build(device)))
