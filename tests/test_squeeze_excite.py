"""The fused squeeze-and-excitation kernels through the public function (interpreted on the CPU,
native on a GPU): outputs, input and parameter gradients against the float64 reference by the
numerics rule, both memory formats, every activation and gate, odd shapes, poisoned outputs."""
import warnings

import pytest
import torch

import attn_fast
from attn_fast import dispatch, reference
from attn_fast.kernels import squeeze_excite as se_module
from numerics import check_op, poison_allocations, rand

se = attn_fast.squeeze_excite


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel never writes fails."""
    poison_allocations(monkeypatch)


@pytest.fixture(autouse=True)
def kernels_must_run(device):
    r = dispatch.route("squeeze_excite", device, torch.float16, warn=False)
    assert r.path == "triton", r.reason


def make(n, c, h, w, cr, dtype=torch.float32, device="cpu", channels_last=False, single=False, bias=True):
    x = rand(n, c, h, w, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if single:  # timm EffectiveSE: one (C, C) fc
        inputs = dict(x=x, fc1_weight=rand(c, c, dtype=dtype, device=device, scale=0.3))
        if bias:
            inputs["fc1_bias"] = rand(c, dtype=dtype, device=device)
        return inputs
    inputs = dict(x=x, fc1_weight=rand(cr, c, dtype=dtype, device=device, scale=0.3),
                  fc2_weight=rand(c, cr, dtype=dtype, device=device, scale=0.3))
    if bias:
        inputs.update(fc1_bias=rand(cr, dtype=dtype, device=device), fc2_bias=rand(c, dtype=dtype, device=device))
    return inputs


def check(inputs, **kw):
    grads = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the reference
        results = check_op(se, reference.squeeze_excite, {**inputs, **kw}, grad=grads)
    x = inputs["x"]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    assert se(**inputs, **kw).is_contiguous(memory_format=fmt), "output memory format differs from x's"
    return results


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_dtypes_layouts_pools(dtype, device, channels_last, pool):
    check(make(2, 24, 5, 7, 6, dtype=dtype, device=device, channels_last=channels_last), pool=pool)


@pytest.mark.parametrize("activation", ["relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish", "identity"])
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_activations_and_gates(activation, gate, device):
    check(make(2, 20, 3, 4, 5, device=device), activation=activation, gate=gate)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (3, 40, 1, 1, 8), (2, 7, 13, 1, 3), (1, 130, 2, 3, 9),
                                   (2, 17, 19, 23, 4)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_odd_shapes(shape, channels_last, device):
    check(make(*shape, dtype=torch.float16, device=device, channels_last=channels_last), activation="silu")


@pytest.mark.parametrize("dtype_case", [torch.float32, torch.bfloat16])
def test_single_fc_effective_se(dtype_case, device):
    check(make(2, 20, 4, 4, 0, dtype=dtype_case, device=device, single=True), gate="hardsigmoid")
    check(make(2, 20, 4, 4, 0, device=device, single=True, bias=False, channels_last=True), gate="hardsigmoid",
          pool="avgmax")


def test_no_biases_and_conv_weights(device):
    inputs = make(2, 24, 6, 5, 6, device=device, bias=False)
    inputs["fc1_weight"] = inputs["fc1_weight"][:, :, None, None]   # 1x1 conv weights, as in torchvision
    inputs["fc2_weight"] = inputs["fc2_weight"][:, :, None, None]
    check(inputs, activation="hardswish")


def test_other_strides_are_copied_and_still_right(device):
    inputs = make(2, 24, 6, 10, 6, device=device)
    inputs["x"] = inputs["x"][:, :, :, ::2]   # neither NCHW- nor channels_last-contiguous
    check(inputs)


def test_max_pool_ties_share_the_gradient(device):
    """Equal maxima in a channel split the max-pool gradient evenly, as torch's amax does."""
    inputs = make(2, 8, 4, 4, 4, device=device)
    x = inputs["x"]
    x[:, :, 0, 0] = 3.0
    x[:, :, 2, 1] = 3.0
    check(inputs, pool="avgmax")


def test_sample_groups_for_l2(device, monkeypatch):
    """The launcher runs the passes over groups of samples (so a group's x is still in L2 for the
    second pass); with one sample per group the result is the same."""
    monkeypatch.setattr(se_module, "SAMPLE_GROUP_BYTES", 1)
    check(make(3, 24, 5, 5, 6, device=device, channels_last=True), pool="avgmax")
    check(make(3, 20, 4, 4, 0, device=device, single=True), gate="hardsigmoid")


def test_parameter_gradients_only(device):
    """x without requires_grad: the weights still get theirs (and dx is not needed)."""
    inputs = make(2, 16, 3, 3, 4, device=device)
    w = inputs["fc1_weight"].clone().requires_grad_(True)
    y = se(inputs["x"], w, inputs["fc1_bias"], inputs["fc2_weight"], inputs["fc2_bias"])
    y.sum().backward()
    w64 = inputs["fc1_weight"].double().requires_grad_(True)
    reference.squeeze_excite(inputs["x"].double(), w64, inputs["fc1_bias"].double(), inputs["fc2_weight"].double(),
                             inputs["fc2_bias"].double()).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_bf16_rounding_under_the_interpreter_is_to_nearest(device):
    """The interpreter truncates fp32 -> bf16 casts; the kernels round to nearest themselves there
    (kernels/interpreter.py), so y = x * s is within half a bf16 ulp of the exact product."""
    inputs = make(2, 16, 8, 8, 4, dtype=torch.bfloat16, device=device)
    out = se_module.se_forward(inputs["x"], inputs["fc1_weight"], inputs["fc1_bias"], inputs["fc2_weight"],
                               inputs["fc2_bias"], "relu", "sigmoid", "avg")
    exact = inputs["x"].double() * out["s"].double()[:, :, None, None]
    _, exponent = torch.frexp(exact)          # exact = m * 2**exponent, 0.5 <= |m| < 1
    half_ulp = torch.ldexp(torch.ones_like(exact), exponent - 9)   # bf16 keeps 8 significant bits
    err = (out["y"].double() - exact).abs()
    assert (err <= half_ulp).all(), (err / half_ulp).max()


def test_torch_compile_fullgraph(device):
    inputs = make(2, 16, 4, 4, 4, device=device)

    def f(x, w1, b1, w2, b2):
        return se(x, w1, b1, w2, b2, activation="silu").square().sum()

    args = [inputs[k].clone().requires_grad_(True) for k in ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    out.backward()
    args2 = [a.detach().clone().requires_grad_(True) for a in args]
    f(*args2).backward()
    torch.testing.assert_close(out, f(*args2))
    for a, b in zip(args, args2):
        torch.testing.assert_close(a.grad, b.grad)


def test_fake_tensors_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
        outs = torch.ops.attn_fast.se_fwd(x, torch.empty(4, 16), None, torch.empty(16, 4), None, "relu", "sigmoid",
                                          "avgmax")
    assert outs[0].shape == x.shape and outs[0].is_contiguous(memory_format=torch.channels_last)
    assert [tuple(o.shape) for o in outs[1:]] == [(2, 16), (2, 16), (2, 4), (2, 4), (2, 16), (2, 16)]


def test_gradcheck_cpu_path_float64():
    inputs = {k: v.double().requires_grad_(True) for k, v in make(1, 6, 2, 3, 2).items()}
    args = tuple(inputs[k] for k in ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"))
    assert torch.autograd.gradcheck(lambda x, w1, b1, w2, b2: se(x, w1, b1, w2, b2, activation="silu"), args)


eca = attn_fast.efficient_channel_attention


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_eca_matches_reference(dtype, device, channels_last, k):
    x = rand(2, 37, 5, 3, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = dict(x=x, conv_weight=rand(1, 1, k, dtype=dtype, device=device))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check_op(eca, reference.efficient_channel_attention, inputs, grad=("x", "conv_weight"))
    assert eca(**inputs).is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_eca_hardsigmoid_flat_weight_and_groups(device, monkeypatch):
    monkeypatch.setattr(se_module, "SAMPLE_GROUP_BYTES", 1)
    inputs = dict(x=rand(3, 300, 2, 2, device=device), conv_weight=rand(7, device=device))
    check_op(eca, reference.efficient_channel_attention, {**inputs, "gate": "hardsigmoid"},
             grad=("x", "conv_weight"))


def test_eca_bad_input():
    x = rand(2, 8, 3, 3)
    with pytest.raises(ValueError, match="conv_weight must have shape"):
        eca(x, rand(1, 1, 4))
    with pytest.raises(ValueError, match="conv_weight must have shape"):
        eca(x, rand(2, 1, 3))
    with pytest.raises(ValueError, match="gate"):
        eca(x, rand(3), gate="relu")
    with pytest.raises(ValueError, match="x must be 4-D"):
        eca(rand(8, 3), rand(3))


# ---------------------------------------------------------------------------------------------
# Against the real torchvision / timm layers: their parameters through the public functions,
# compared with the module itself (run on the same parameters via functional_call) by the rule.
# ---------------------------------------------------------------------------------------------

def _against_module(module, fast, x):
    params = {name: p.detach().to(x.dtype) for name, p in module.named_parameters()}

    def ref(x, **p):
        return torch.func.functional_call(module, p, (x,))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check_op(fast, ref, {"x": x, **params}, grad=["x", *params])


def _tv_se(act, gate):
    return lambda x, **p: se(x, p["fc1.weight"], p["fc1.bias"], p["fc2.weight"], p["fc2.bias"], activation=act,
                             gate=gate)


@pytest.mark.parametrize("act,gate,channels_last", [("relu", "sigmoid", False), ("hardswish", "hardsigmoid", True)])
def test_torchvision_squeeze_excitation_module(act, gate, channels_last, dtype, device):
    tv = pytest.importorskip("torchvision")
    acts = {"relu": torch.nn.ReLU, "hardswish": torch.nn.Hardswish}
    gates = {"sigmoid": torch.nn.Sigmoid, "hardsigmoid": torch.nn.Hardsigmoid}
    module = tv.ops.SqueezeExcitation(24, 8, activation=acts[act], scale_activation=gates[gate]).to(device)
    x = rand(2, 24, 5, 6, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _against_module(module, _tv_se(act, gate), x)


@pytest.mark.parametrize("add_maxpool", [False, True])
def test_timm_se_and_effective_se_modules(add_maxpool, device):
    timm = pytest.importorskip("timm")
    x = rand(2, 32, 4, 5, device=device)
    pool = "avgmax" if add_maxpool else "avg"
    module = timm.layers.SEModule(32, add_maxpool=add_maxpool, act_layer=torch.nn.SiLU).to(device)
    _against_module(module, lambda x, **p: se(x, p["fc1.weight"], p["fc1.bias"], p["fc2.weight"], p["fc2.bias"],
                                              activation="silu", pool=pool), x)
    module = timm.layers.EffectiveSEModule(32, add_maxpool=add_maxpool).to(device)
    _against_module(module, lambda x, **p: se(x, p["fc.weight"], p["fc.bias"], gate="hardsigmoid", pool=pool), x)


def test_timm_efficientnet_squeeze_excite_and_eca_modules(device):
    pytest.importorskip("timm")
    import timm
    from timm.models._efficientnet_blocks import SqueezeExcite

    x = rand(2, 40, 3, 7, dtype=torch.bfloat16, device=device).contiguous(memory_format=torch.channels_last)
    module = SqueezeExcite(40, rd_ratio=0.25, act_layer=torch.nn.SiLU).to(device)
    _against_module(module, lambda x, **p: se(x, p["conv_reduce.weight"], p["conv_reduce.bias"],
                                              p["conv_expand.weight"], p["conv_expand.bias"], activation="silu"), x)
    module = timm.layers.EcaModule(kernel_size=5).to(device)
    _against_module(module, lambda x, **p: eca(x, p["conv.weight"]), x)
