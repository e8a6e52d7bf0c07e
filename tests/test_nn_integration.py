"""attn_fast.nn modules inside the tools models run under (issue 18): autocast (item 6), torch.fx
symbolic tracing and the feature extractors built on it (item 7), nested-tensor inputs to
MultiheadAttention (item 8), and exception types a caller written against torch catches (item 10).

Every module runs on both paths: ``reference`` (the CPU path) and ``triton`` (the kernels, interpreted
on the CPU; run this file with TRITON_INTERPRET=0 to get the plain CPU path only). Shapes are tiny.
"""
import copy
import warnings

import pytest
import torch
import torch.fx
from torch import nn

import attn_fast
from attn_fast import InputError, InputTypeError
from attn_fast import nn as fnn
from attn_fast.dispatch import interpreter_enabled
from attn_fast.nn import multihead_attention as mha_module
from numerics import assert_close
from test_se_modules import randomize

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers.attention import Attention as TimmAttention  # noqa: E402
from timm.layers.cbam import CbamModule, LightCbamModule  # noqa: E402
from timm.layers.eca import EcaModule as TimmEca  # noqa: E402
from timm.layers.squeeze_excite import EffectiveSEModule as TimmEffectiveSE  # noqa: E402
from timm.layers.squeeze_excite import SEModule as TimmSE  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite as TimmBlockSE  # noqa: E402
from torchvision.ops import SqueezeExcitation  # noqa: E402

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """The path every op takes in the test: the reference (the CPU path) or the kernels."""
    if request.param == "triton" and not (torch.cuda.is_available() or interpreter_enabled()):
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1")
    attn_fast.set_backend(request.param)  # conftest's fixture restores the default afterwards
    return request.param


def no_fallback():
    """Warnings that an op fell back to the reference become errors (the kernels must run)."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", RuntimeWarning)
    return ctx


# ------------------------------------------------------------------------------------ item 6: autocast

def image(device, c=16):
    return torch.randn(2, c, 4, 5, device=device)


ORIGINALS = {
    "cbam": (lambda: CbamModule(16, rd_channels=4, spatial_kernel_size=3), image),
    "light_cbam": (lambda: LightCbamModule(16, rd_channels=4, spatial_kernel_size=3), image),
    "tv_se": (lambda: SqueezeExcitation(16, 4), image),
    "se": (lambda: TimmSE(16, rd_channels=4, add_maxpool=True), image),
    "se_batchnorm": (lambda: TimmSE(16, rd_channels=4, norm_layer=nn.BatchNorm2d), image),
    "effective_se": (lambda: TimmEffectiveSE(16), image),
    "block_se": (lambda: TimmBlockSE(16), image),
    "eca": (lambda: TimmEca(16), image),
    "vit": (lambda: TimmAttention(16, num_heads=2), lambda device: torch.randn(2, 5, 16, device=device)),
}


def check_under_autocast(original: nn.Module, x: torch.Tensor, ac_dtype: torch.dtype, *, call=None):
    """The converted module under autocast against the original under the same autocast, by the
    numerics rule (float64 original without autocast as the truth): output, its dtype, the gradients
    of x and of every parameter (and their dtypes), and the BatchNorm buffers after the step."""
    call = call or (lambda m, x: m(x))
    device = x.device.type
    fast = attn_fast.convert(copy.deepcopy(original))
    assert type(fast).__module__.startswith("attn_fast.nn"), type(fast)
    lp, f64 = copy.deepcopy(original), copy.deepcopy(original).double()
    runs = {}
    for label, module, xin, autocast in (("fast", fast, x, True), ("lp", lp, x, True),
                                         ("64", f64, x.double(), False)):
        xin = xin.detach().clone().requires_grad_()
        with torch.autocast(device, dtype=ac_dtype, enabled=autocast):
            if label == "fast":
                ctx = no_fallback()
                try:
                    y = call(module, xin)
                finally:
                    ctx.__exit__(None, None, None)
            else:
                y = call(module, xin)
        runs[label] = (module, xin, y)
    (_, _, y_fast), (_, _, y_lp), (_, _, y64) = runs["fast"], runs["lp"], runs["64"]
    assert y_fast.dtype == y_lp.dtype, (y_fast.dtype, y_lp.dtype)
    assert_close(y_fast, y64, y_lp, "output", dtype=ac_dtype)
    dy = torch.randn(y64.shape, dtype=torch.float64, device=y64.device)
    for module, xin, y in runs.values():
        y.backward(dy.to(y.dtype))
    assert runs["fast"][1].grad.dtype == runs["lp"][1].grad.dtype
    assert_close(runs["fast"][1].grad, runs["64"][1].grad, runs["lp"][1].grad, "x.grad", dtype=ac_dtype)
    params = [dict(runs[k][0].named_parameters()) for k in ("fast", "64", "lp")]
    for name, p in params[0].items():
        assert p.grad.dtype == params[2][name].grad.dtype == p.dtype, name
        assert_close(p.grad, params[1][name].grad, params[2][name].grad, f"{name}.grad", dtype=ac_dtype)
    buffers = [dict(runs[k][0].named_buffers()) for k in ("fast", "64", "lp")]
    for name, b in buffers[0].items():
        assert b.dtype == buffers[2][name].dtype, name
        if b.is_floating_point():
            assert_close(b, buffers[1][name], buffers[2][name], f"buffer {name}", dtype=ac_dtype)
        else:
            assert torch.equal(b, buffers[2][name]), name
    return y_fast


@pytest.mark.parametrize("x_dtype", ["x_fp32", "x_autocast_dtype"])
@pytest.mark.parametrize("ac_dtype", AUTOCAST_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["cbam", "light_cbam"])
def test_converted_cbam_under_autocast(name, train, ac_dtype, x_dtype, backend, device):
    """Issue 18.6: a converted CBAM under autocast with a 16-bit x (what the layer before it gives)
    raised "expected scalar type BFloat16 but found Float" on the CPU path (its BatchNorm weight was
    cast, its running statistics were not). BatchNorm train and eval, both 16-bit dtypes, x in fp32
    (a model's input) or in the autocast dtype."""
    make, inputs = ORIGINALS[name]
    original = randomize(make()).to(device).train(train)
    x = inputs(device)
    if x_dtype == "x_autocast_dtype":
        x = x.to(ac_dtype)
    check_under_autocast(original, x, ac_dtype)


@pytest.mark.parametrize("x_dtype", ["x_fp32", "x_autocast_dtype"])
@pytest.mark.parametrize("ac_dtype", AUTOCAST_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["tv_se", "se", "se_batchnorm", "effective_se", "block_se", "eca", "vit"])
def test_other_converted_modules_under_autocast(name, train, ac_dtype, x_dtype, backend, device):
    """The same check for the SE family (SEModule with a BatchNorm norm layer in train and eval mode
    included) and the ViT attention."""
    make, inputs = ORIGINALS[name]
    original = randomize(make()).to(device).train(train)
    x = inputs(device)
    check_under_autocast(original, x.to(ac_dtype) if x_dtype == "x_autocast_dtype" else x, ac_dtype)


@pytest.mark.parametrize("ac_dtype", AUTOCAST_DTYPES, ids=["bf16", "fp16"])
def test_converted_multihead_attention_under_autocast(ac_dtype, backend, device):
    original = randomize(nn.MultiheadAttention(16, 2, batch_first=True)).to(device).eval()
    x = torch.randn(2, 5, 16, device=device)
    check_under_autocast(original, x, ac_dtype, call=lambda m, x: m(x, x, x, need_weights=False)[0])


# --------------------------------------------------------------------------- item 7: torch.fx tracing

MODULES = {
    "SqueezeExcite": (lambda: fnn.SqueezeExcite(16, 4), image),
    "SEModule": (lambda: fnn.SEModule(16, rd_channels=4, add_maxpool=True), image),
    "SEModule-batchnorm": (lambda: fnn.SEModule(16, rd_channels=4, norm_layer=nn.BatchNorm2d), image),
    "EffectiveSEModule": (lambda: fnn.EffectiveSEModule(16), image),
    "EfficientNetSqueezeExcite": (lambda: fnn.EfficientNetSqueezeExcite(16), image),
    "EcaModule": (lambda: fnn.EcaModule(16), image),
    "CBAM": (lambda: fnn.CBAM(16, rd_channels=4, spatial_kernel_size=3), image),
    "CBAM-light": (lambda: fnn.CBAM(16, rd_channels=4, spatial_kernel_size=3, light=True), image),
    "VitAttention": (lambda: fnn.VitAttention.from_module(TimmAttention(16, num_heads=2)),
                     lambda device: torch.randn(2, 5, 16, device=device)),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODULES))
def test_symbolic_trace_of_each_module(name, train, backend, device):
    """Issue 18.7: torch.fx.symbolic_trace(module) raised "x must be a torch.Tensor, got Proxy". The
    fused op is one call_function node; the GraphModule gives the module's result (and updates the
    BatchNorm buffers as the module does), and still checks its input."""
    make, inputs = MODULES[name]
    module = randomize(make()).to(device).train(train)
    twin = copy.deepcopy(module)
    graph = torch.fx.symbolic_trace(twin)
    ours = [n for n in graph.graph.nodes if n.op == "call_function" and n.target.__module__.startswith("attn_fast")]
    assert len(ours) == 1, graph.code
    x = inputs(device)
    ctx = no_fallback()
    try:
        for _ in range(2):  # twice: BatchNorm's running statistics and batch count evolve the same
            want, got = module(x), graph(x)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        ctx.__exit__(None, None, None)
    for (key, a), (_, b) in zip(module.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), key
    if name != "VitAttention":  # its checks are skipped in the trace (its graph is timm's, ops and all)
        with pytest.raises(InputError, match=r"must be 4-D \(N, C, H, W\)"):
            graph(x[0])


class _Holder(nn.Module):
    """A model holding a MultiheadAttention (torch's is a leaf of the trace, ours one call)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x, mask):
        out, _ = self.attention(x, x, x, attn_mask=mask, need_weights=False)
        return out * 2


@pytest.mark.parametrize("batch_first", [False, True])
def test_symbolic_trace_of_a_model_holding_multihead_attention(batch_first, backend, device):
    original = randomize(nn.MultiheadAttention(16, 2, batch_first=batch_first)).to(device).eval()
    fast = fnn.MultiheadAttention.from_module(copy.deepcopy(original))
    model = _Holder(fast)
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 5, 16, device=device) if batch_first else torch.randn(5, 2, 16, device=device)
    mask = torch.rand(5, 5, device=device) > 0.3
    mask[:, 0] = False  # every query sees a key
    with torch.no_grad():
        torch.testing.assert_close(graph(x, mask), model(x, mask), rtol=0, atol=0)
        torch.testing.assert_close(graph(x, mask), _Holder(original)(x, mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):  # the graph checks as the module does
        graph(x[..., :8], mask)


def test_multihead_attention_as_the_root_of_a_trace_fails_as_torchs():
    """torch's MultiheadAttention cannot be traced as the root (its forward branches on its
    inputs): neither can ours, with the same exception type and a message saying what works."""
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(nn.MultiheadAttention(16, 2))
    with pytest.raises(torch.fx.proxy.TraceError, match="trace a module that contains it"):
        torch.fx.symbolic_trace(fnn.MultiheadAttention(16, 2))


def test_torchvision_create_feature_extractor(backend, device):
    """torchvision's create_feature_extractor (fx, traced in train and eval mode) on a converted
    MobileNetV3-small (its SqueezeExcitation layers become attn_fast.nn.SqueezeExcite)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    original = randomize(torchvision.models.mobilenet_v3_small(width_mult=0.25)).to(device).eval()
    converted, report = attn_fast.convert(copy.deepcopy(original), report=True)
    assert report.swapped and not report.skipped
    nodes = {"features.1": "se_block", "features.4": "middle", "features.12": "last"}
    extractor = create_feature_extractor(converted, return_nodes=nodes)
    reference = create_feature_extractor(original, return_nodes=nodes)
    x = torch.randn(1, 3, 32, 32, device=device)
    ctx = no_fallback()
    try:
        with torch.no_grad():
            got, want = extractor(x), reference(x)
            whole = converted.features(x)
    finally:
        ctx.__exit__(None, None, None)
    assert list(got) == list(nodes.values())
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["last"], whole, rtol=0, atol=0)


@pytest.mark.parametrize("attn_layer", ["cbam", "lcbam", "se", "eca"])
def test_timm_fx_feature_extraction(attn_layer, backend, device):
    """timm's fx feature path (FeatureGraphNet, what features_only=True, feature_cls='fx' builds) on
    a tiny converted ResNet with CBAM / SE / ECA blocks."""
    from timm.models._features_fx import FeatureGraphNet
    from timm.models.resnet import BasicBlock, ResNet

    original = ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 16, 16), stem_width=8, num_classes=0,
                      zero_init_last=False, block_args=dict(attn_layer=attn_layer))
    original = randomize(original).to(device).eval()
    converted, report = attn_fast.convert(copy.deepcopy(original), report=True)
    assert len(report.swapped) == 4 and not report.skipped
    features = FeatureGraphNet(converted, out_indices=(1, 2, 4))
    x = torch.randn(1, 3, 16, 16, device=device)
    ctx = no_fallback()
    try:
        with torch.no_grad():
            got = features(x)
            last = converted.forward_features(x)
    finally:
        ctx.__exit__(None, None, None)
    want = FeatureGraphNet(original, out_indices=(1, 2, 4))(x)
    assert [t.shape for t in got] == [t.shape for t in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[-1], last, rtol=0, atol=0)


# ------------------------------------------------------------------ item 8: nested-tensor inputs (MHA)

@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_takes_nested_tensors_as_torch(need_weights, device):
    """Issue 18.8: a nested-tensor batch (inference, no_grad) goes to torch's implementation, whose
    fast path takes it, instead of failing in our checks; the result equals torch's module."""
    original = randomize(nn.MultiheadAttention(16, 2, batch_first=True)).to(device).eval()
    fast = fnn.MultiheadAttention.from_module(copy.deepcopy(original))
    nested = torch.nested.nested_tensor([torch.randn(3, 16, device=device), torch.randn(5, 16, device=device)])
    with torch.no_grad():
        got, got_w = fast(nested, nested, nested, need_weights=need_weights)
        want, want_w = original(nested, nested, nested, need_weights=need_weights)
    assert got.is_nested
    for g, w in zip(got.unbind(), want.unbind()):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        torch.testing.assert_close(got_w, want_w, rtol=0, atol=0)
    # outside torch's fast path (gradients on) torch refuses nested tensors: so do we, as torch does
    with pytest.raises(AssertionError, match="NestedTensor"):
        original(nested, nested, nested, need_weights=False)
    with pytest.raises(AssertionError, match="NestedTensor"):
        fast(nested, nested, nested, need_weights=False)


# ------------------------------------------------------------------------- item 10: exception types

def _seq(length, batch, width=8, batch_first=False):
    return torch.randn(batch, length, width) if batch_first else torch.randn(length, batch, width)


def _mha_cases(bf):
    """(name, (query, key, value), keyword arguments) with one thing wrong; batch 2, L 3, S 4, E 8."""
    q, k = _seq(3, 2, batch_first=bf), _seq(4, 2, batch_first=bf)
    boolean = dict(dtype=torch.bool)
    return [
        ("query-width", (_seq(3, 2, 6, bf), k, k), {}),
        ("key-value-width", (q, _seq(4, 2, 6, bf), _seq(4, 2, 6, bf)), {}),
        ("key-value-length", (q, k, _seq(5, 2, batch_first=bf)), {}),
        ("key-value-batch", (q, k, _seq(4, 3, batch_first=bf)), {}),
        ("value-width", (q, k, _seq(4, 2, 6, bf)), {}),
        ("query-key-batch", (q, _seq(4, 3, batch_first=bf), _seq(4, 3, batch_first=bf)), {}),
        ("key-2D", (q, k[0], k[0]), {}),
        ("query-4D", (q[None], k[None], k[None]), {}),
        ("attn_mask-2D-shape", (q, k, k), dict(attn_mask=torch.zeros(3, 5, **boolean))),
        ("attn_mask-3D-shape", (q, k, k), dict(attn_mask=torch.zeros(3, 3, 4))),
        ("attn_mask-4D", (q, k, k), dict(attn_mask=torch.zeros(2, 2, 3, 4, **boolean))),
        ("attn_mask-1D", (q, k, k), dict(attn_mask=torch.zeros(4, **boolean))),
        ("attn_mask-int", (q, k, k), dict(attn_mask=torch.zeros(3, 4, dtype=torch.int64))),
        ("key_padding_mask-length", (q, k, k), dict(key_padding_mask=torch.zeros(2, 5, **boolean))),
        ("key_padding_mask-batch", (q, k, k), dict(key_padding_mask=torch.zeros(3, 4, **boolean))),
        ("key_padding_mask-1D", (q, k, k), dict(key_padding_mask=torch.zeros(4, **boolean))),
        ("key_padding_mask-int", (q, k, k), dict(key_padding_mask=torch.zeros(2, 4, dtype=torch.int64))),
        ("unbatched-attn_mask-3D", (q.flatten(0, 1)[:3], k.flatten(0, 1)[:4], k.flatten(0, 1)[:4]),
         dict(attn_mask=torch.zeros(3, 3, 4))),
        ("unbatched-key_padding_mask", (q.flatten(0, 1)[:3], k.flatten(0, 1)[:4], k.flatten(0, 1)[:4]),
         dict(key_padding_mask=torch.zeros(5, **boolean))),
        ("query-f64-module-f32", (q.double(), k.double(), k.double()), {}),
        ("key-f64", (q, k.double(), k.double()), {}),
    ]


def _raised(call):
    try:
        call()
    except Exception as err:  # noqa: BLE001 - the point is which type
        return err
    return None


_CASE_NAMES = [name for name, _, _ in _mha_cases(False)]


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "need_weights"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("case", _CASE_NAMES)
def test_multihead_attention_raises_what_torch_raises(case, batch_first, need_weights):
    """Issue 18.10: where torch's MultiheadAttention asserts, ours is also an AssertionError; where
    it raises RuntimeError, ours is one too; ours stays a ValueError/TypeError naming the argument."""
    _, args, kw = next(c for c in _mha_cases(batch_first) if c[0] == case)
    original = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    fast = fnn.MultiheadAttention.from_module(copy.deepcopy(original))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about some of these before it raises
        torch_error = _raised(lambda: original(*args, need_weights=need_weights, **kw))
    assert torch_error is not None, "torch takes this input: not a bad-input case"
    torch_type = AssertionError if isinstance(torch_error, AssertionError) else RuntimeError
    assert isinstance(torch_error, torch_type), repr(torch_error)
    with pytest.raises(torch_type, match=r"^MultiheadAttention: ") as info:
        fast(*args, need_weights=need_weights, **kw)
    assert isinstance(info.value, (InputError, InputTypeError)), repr(info.value)


@pytest.mark.parametrize("case", ["query-width", "key-value-length", "attn_mask-4D", "key_padding_mask-length",
                                  "attn_mask-int"])
def test_multihead_attention_assertion_cases_are_named_classes(case):
    _, args, kw = next(c for c in _mha_cases(False) if c[0] == case)
    want = getattr(mha_module, "MultiheadAttentionTypeAssertionError" if case.endswith("-int")
                   else "MultiheadAttentionAssertionError")
    with pytest.raises(want):
        fnn.MultiheadAttention(8, 2)(*args, need_weights=False, **kw)


def test_multihead_attention_constructor_raises_what_torch_raises():
    with pytest.raises(AssertionError):
        nn.MultiheadAttention(10, 3)
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads") as info:
        fnn.MultiheadAttention(10, 3)
    assert isinstance(info.value, ValueError)


_BAD_X = {
    "rank": lambda x: x[0],
    "channels": lambda x: x[:, :-1],
    "dtype": lambda x: x.double(),
}


@pytest.mark.parametrize("bad", list(_BAD_X))
@pytest.mark.parametrize("name", list(MODULES))
def test_module_input_errors_are_runtime_errors_too(name, bad):
    """Issue 18.10: the modules' own input checks raise InputError / InputTypeError, which
    ``except RuntimeError`` (what torch's layers raise for a wrong shape or dtype) catches too."""
    if bad == "channels" and name == "EcaModule":
        pytest.skip("EcaModule takes any number of channels")
    make, inputs = MODULES[name]
    module = make()
    x = _BAD_X[bad](inputs("cpu"))
    if bad == "channels" and x.dim() == 3:
        x = inputs("cpu")[..., :-1]
    with pytest.raises(RuntimeError, match=rf"^{type(module).__name__}: x ") as info:
        module(x)
    assert isinstance(info.value, (InputError, InputTypeError)), repr(info.value)
    assert isinstance(info.value, TypeError if bad == "dtype" else ValueError)


def test_constructor_argument_errors_are_input_errors():
    with pytest.raises(InputError, match="act_layer must be one of"):
        fnn.SEModule(8, act_layer="tanh-ish")
    with pytest.raises(InputTypeError, match="act_layer must be a name"):
        fnn.SEModule(8, act_layer=3)
    with pytest.raises(InputError, match="rd_channels"):
        fnn.EfficientNetSqueezeExcite(2, rd_ratio=0.1)
    with pytest.raises(InputError, match="head size"):
        fnn.MultiheadAttention(514, 1)
    with pytest.raises(fnn.UnsupportedLayerError):  # unchanged: a layer the kernels do not cover
        fnn.SEModule(8, act_layer=nn.Tanh)
