"""The fused CBAM kernels through the public function (interpreted on the CPU, native on a GPU):
outputs, input and parameter gradients, and BatchNorm running statistics against the float64
reference by the numerics rule; both memory formats, every activation and gate, both variants
(CbamModule, LightCbamModule), the paper's options, odd shapes, max ties, poisoned outputs."""
import warnings

import pytest
import torch

import attn_fast
from attn_fast import dispatch, reference
from numerics import assert_close, check_op, poison_allocations, rand

cbam = attn_fast.cbam


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel never writes fails."""
    poison_allocations(monkeypatch)


@pytest.fixture(autouse=True)
def kernels_must_run(device):
    r = dispatch.route("cbam", device, torch.float16, warn=False)
    assert r.path == "triton", r.reason


def make(n, c, h, w, cr, *, dtype=torch.float32, device="cpu", channels_last=False, light=False, k=7,
         biases=False, bn=True):
    x = rand(n, c, h, w, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = dict(dtype=dtype, device=device)
    inputs = dict(x=x, fc1_weight=rand(cr, c, scale=0.3, **p), fc2_weight=rand(c, cr, scale=0.3, **p),
                  conv_weight=rand(1, 1 if light else 2, k, k, scale=0.3, **p))
    if biases:
        inputs.update(fc1_bias=rand(cr, **p), fc2_bias=rand(c, **p), conv_bias=rand(1, **p))
    if bn:
        inputs.update(bn_weight=rand(1, **p), bn_bias=rand(1, **p))
    return inputs


def check(inputs, *, train=False, momentum=0.1, **kw):
    """Compare outputs and every gradient by the rule; with a BatchNorm also its running statistics
    after the step (each run updates its own copy, in the run's dtype)."""
    x = inputs["x"]
    grads = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    stats = {}
    with_bn = "bn_weight" in inputs
    if with_bn:
        mean0 = rand(1, dtype=torch.float64)
        var0 = torch.rand(1, dtype=torch.float64) + 0.5

    def run(fn, label):
        def call(**a):
            extra = dict(kw)
            if with_bn:
                rm, rv = mean0.clone().to(a["x"]), var0.clone().to(a["x"])
                stats[label] = (rm, rv)
                extra.update(bn_running_mean=rm, bn_running_var=rv, bn_training=train, bn_momentum=momentum)
            return fn(**a, **extra)
        return call

    def reference_run(**a):  # check_op runs the reference in the test's dtype and in float64
        return run(reference.cbam, "64" if a["x"].dtype == torch.float64 else "lp")(**a)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the reference
        results = check_op(run(cbam, "fast"), reference_run, inputs, grad=grads)
    if with_bn:
        for i, name in enumerate(("running_mean", "running_var")):
            assert_close(stats["fast"][i], stats["64"][i], stats["lp"][i], name, dtype=x.dtype)
        if train:
            assert not torch.equal(stats["fast"][1], var0.to(stats["fast"][1])), "running stats not updated"
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    assert run(cbam, "format")(**inputs).is_contiguous(memory_format=fmt), "output memory format differs from x's"
    return results


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("light", [False, True], ids=["cbam", "light"])
def test_dtypes_layouts_variants(dtype, device, channels_last, light):
    check(make(2, 24, 5, 7, 6, dtype=dtype, device=device, channels_last=channels_last, light=light),
          light=light)


@pytest.mark.parametrize("light", [False, True], ids=["cbam", "light"])
@pytest.mark.parametrize("dtype_case", [torch.float32, torch.bfloat16])
def test_batchnorm_training_updates_running_stats(light, dtype_case, device):
    check(make(3, 16, 4, 5, 4, dtype=dtype_case, device=device, light=light, k=3), light=light, train=True)


@pytest.mark.parametrize("light", [False, True], ids=["cbam", "light"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batchnorm_training_with_a_small_conv_weight(light, k, seed, device):
    """Training BatchNorm over a map whose spread is small against its offset (conv weights of about
    1e-2, a bias about 1): its backward cancels exactly only where the normed map has zero mean, so
    the batch statistics are taken in float64. In fp32 they put the conv weight's gradient at up to
    8x the fp32 reference's error (found by the fuzz profile, see tests/test_fuzz.py)."""
    torch.manual_seed(seed)
    inputs = make(2, 8, 6, 6, 4, device=device, light=light, k=k, biases=True)
    inputs["conv_weight"] = inputs["conv_weight"] * 0.03
    inputs["conv_bias"] = inputs["conv_bias"].abs() + 1.0
    check(inputs, light=light, train=True)


@pytest.mark.parametrize("activation,gate", [("silu", "sigmoid"), ("gelu", "hardsigmoid"), ("hardswish", "sigmoid"),
                                             ("relu6", "hardsigmoid"), ("gelu_tanh", "sigmoid")])
def test_activations_and_gates(activation, gate, device):
    check(make(2, 20, 4, 4, 5, device=device, k=5, biases=True), activation=activation, gate=gate)


def test_separate_channel_gate_and_no_batchnorm(device):
    check(make(2, 20, 3, 5, 5, device=device, k=3, biases=True, bn=False), gate="sigmoid",
          channel_gate="hardsigmoid")


def test_paper_module_options(device):
    """The paper's code: MLP biases, [max, mean] map order, BatchNorm momentum 0.01 in training."""
    check(make(2, 32, 6, 6, 2, device=device, biases=True, channels_last=True), spatial_order="max_mean",
          train=True, momentum=0.01)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 1, 1, 1), (1, 130, 3, 5, 9), (2, 17, 19, 23, 4),
                                   (3, 70, 2, 40, 7)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_odd_shapes(shape, channels_last, device):
    # BatchNorm in eval mode: training statistics over a single value are undefined (torch raises)
    check(make(*shape, dtype=torch.float16, device=device, channels_last=channels_last, k=3),
          activation="silu")


def test_max_ties_share_the_gradient(device):
    """Ties of the channel max (over positions) and of the spatial max (over channels) share the
    gradient evenly, as torch's amax backward does."""
    inputs = make(2, 8, 4, 4, 4, device=device, k=3)
    x = inputs["x"]
    x[:, :, 0, 0] = 5.0          # two positions hold each channel's max
    x[:, :, 2, 1] = 5.0
    x[:, :, 3, 3] = 0.0          # every channel of one position equal: x * ca ties over channels
    check(inputs)


def test_other_strides_are_copied_and_still_right(device):
    inputs = make(2, 12, 6, 10, 3, device=device, k=3)
    inputs["x"] = inputs["x"][:, :, :, ::2]
    check(inputs)


def test_training_needs_more_than_one_value():
    inputs = make(1, 8, 1, 1, 2)
    with pytest.raises(ValueError, match="more than one value"):
        cbam(**inputs, bn_running_mean=torch.zeros(1), bn_running_var=torch.ones(1), bn_training=True)


def test_torch_compile_fullgraph_with_running_stats(device):
    inputs = make(2, 16, 4, 4, 4, device=device, k=3)
    names = ("x", "fc1_weight", "fc2_weight", "conv_weight", "bn_weight", "bn_bias")
    rms = [torch.zeros(1, device=device) for _ in range(2)]
    rvs = [torch.ones(1, device=device) for _ in range(2)]

    def f(rm, rv, *args):
        return cbam(**dict(zip(names, args)), bn_running_mean=rm, bn_running_var=rv, bn_training=True,
                    activation="silu").square().sum()

    args = [inputs[k].clone().requires_grad_(True) for k in names]
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(rms[0], rvs[0], *args)
    out.backward()
    args2 = [a.detach().clone().requires_grad_(True) for a in args]
    out2 = f(rms[1], rvs[1], *args2)
    out2.backward()
    torch.testing.assert_close(out, out2)
    for a, b in zip(args, args2):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(rms[0], rms[1])
    torch.testing.assert_close(rvs[0], rvs[1])
    assert not torch.equal(rvs[0], torch.ones(1, device=device))


def test_fake_tensors_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
        outs = torch.ops.attn_fast.cbam_fwd(x, torch.empty(4, 16), None, torch.empty(16, 4), None,
                                            torch.empty(1, 2, 7, 7), None, torch.empty(1), torch.empty(1),
                                            torch.empty(1), torch.empty(1), "relu", "sigmoid", "sigmoid", False,
                                            "mean_max", True, True, 1e-5)
    assert outs[0].shape == x.shape and outs[0].is_contiguous(memory_format=torch.channels_last)
    assert tuple(outs[6].shape) == (2, 16) and tuple(outs[11].shape) == (2, 25)
