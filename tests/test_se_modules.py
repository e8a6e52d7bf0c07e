"""attn_fast.nn's squeeze-and-excitation modules against the real torchvision and timm layers they
replace: ``from_module`` shares the original's parameters (same state_dict keys and tensors), the
constructors build the same state_dict, and outputs, input and parameter gradients (and BatchNorm
running statistics) match the original run in float64 by the numerics rule. Layers the kernels do
not cover are refused with UnsupportedLayerError."""
import copy
import warnings

import pytest
import torch
from torch import nn

import attn_fast
from attn_fast.nn import (EcaModule, EffectiveSEModule, EfficientNetSqueezeExcite, SEModule, SqueezeExcite,
                          UnsupportedLayerError)
from numerics import assert_close, check_op, rand

timm = pytest.importorskip("timm")
tv_ops = pytest.importorskip("torchvision.ops")
from timm.models._efficientnet_blocks import SqueezeExcite as TimmBlockSE  # noqa: E402


def randomize(module: nn.Module) -> nn.Module:
    """Non-trivial parameters and BatchNorm statistics (never the zeros/ones of a fresh layer)."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.5)
    return module


def check_converted(original: nn.Module, cls, x: torch.Tensor, *, train: bool = False):
    """Convert a copy of ``original`` with ``cls.from_module``; compare outputs and gradients (x and
    every parameter) with the original by the rule, plus the BatchNorm buffers after the step."""
    original = randomize(original).train(train)
    fast = cls.from_module(copy.deepcopy(original))
    assert isinstance(fast, cls) and fast.training == train
    assert list(fast.state_dict()) == list(original.state_dict())
    copies = {}  # one module per run, each in the run's dtype, so buffers update independently

    def run(module, x, params):
        key = (id(module), x.dtype)
        if key not in copies:
            copies[key] = copy.deepcopy(module).to(x.dtype)
        return torch.func.functional_call(copies[key], params, (x,))

    names = [n for n, _ in original.named_parameters()]
    inputs = {"x": x, **{n: p.detach().to(x.dtype) for n, p in original.named_parameters()}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no silent fallback to the reference
        check_op(lambda x, **p: run(fast, x, p), lambda x, **p: run(original, x, p), inputs,
                 grad=["x", *names])
    for name, buf in original.named_buffers():
        if buf.is_floating_point():
            got = dict(copies[(id(fast), x.dtype)].named_buffers())[name]
            lp = dict(copies[(id(original), x.dtype)].named_buffers())[name]
            ref = dict(copies[(id(original), torch.float64)].named_buffers())[name]
            assert_close(got, ref, lp, f"buffer {name}", dtype=x.dtype)
    return fast


def shares_parameters(fast: nn.Module, original: nn.Module) -> bool:
    mine = dict(fast.named_parameters())
    return all(mine[n] is p for n, p in original.named_parameters()) and len(mine) == len(list(original.parameters()))


def image(n, c, h, w, dtype=torch.float32, device="cpu", channels_last=False):
    x = rand(n, c, h, w, dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("act,gate,channels_last", [(nn.ReLU, nn.Sigmoid, False), (nn.Hardswish, nn.Hardsigmoid, True)])
def test_torchvision_squeeze_excitation(act, gate, channels_last, dtype, device):
    original = tv_ops.SqueezeExcitation(24, 8, activation=act, scale_activation=gate).to(device)
    check_converted(original, SqueezeExcite, image(2, 24, 5, 6, dtype, device, channels_last))
    fast = SqueezeExcite.from_module(original)
    assert shares_parameters(fast, original)


@pytest.mark.parametrize("add_maxpool", [False, True])
@pytest.mark.parametrize("act", ["relu", "swish", "gelu_tanh"])
def test_timm_se_module(add_maxpool, act, device):
    original = timm.layers.SEModule(32, add_maxpool=add_maxpool, act_layer=act).to(device)
    check_converted(original, SEModule, image(2, 32, 4, 5, device=device))


@pytest.mark.parametrize("train", [False, True], ids=["eval_folded", "train_batch_stats"])
@pytest.mark.parametrize("add_maxpool", [False, True])
def test_timm_se_module_with_batchnorm(train, add_maxpool, dtype, device):
    """Eval mode folds the BatchNorm into fc1 (fused path); training mode runs it between the pooling
    and scaling kernels (its MLP in fp32), updating the running statistics as the original does."""
    original = timm.layers.SEModule(32, rd_channels=8, add_maxpool=add_maxpool, bias=not add_maxpool,
                                    norm_layer=nn.BatchNorm2d).to(device)
    check_converted(original, SEModule, image(4, 32, 3, 5, dtype, device, channels_last=add_maxpool), train=train)


def test_timm_se_module_with_group_norm(device):
    original = timm.layers.SEModule(32, rd_channels=8, norm_layer=lambda c, **dd: nn.GroupNorm(2, c, **dd)).to(device)
    check_converted(original, SEModule, image(2, 32, 3, 3, device=device))


@pytest.mark.parametrize("add_maxpool", [False, True])
def test_timm_effective_se(add_maxpool, device):
    original = timm.layers.EffectiveSEModule(24, add_maxpool=add_maxpool).to(device)
    check_converted(original, EffectiveSEModule, image(2, 24, 3, 4, torch.bfloat16, device, channels_last=True))


@pytest.mark.parametrize("act,gate", [(nn.SiLU, nn.Sigmoid), ("hard_swish", "hard_sigmoid"), (nn.ReLU6, "sigmoid")])
def test_timm_efficientnet_block_squeeze_excite(act, gate, device):
    original = TimmBlockSE(40, rd_ratio=0.25, act_layer=act, gate_layer=gate).to(device)
    check_converted(original, EfficientNetSqueezeExcite, image(2, 40, 3, 7, torch.float16, device))


@pytest.mark.parametrize("channels,kernel_size", [(None, 5), (64, 3), (256, 3)])
def test_timm_eca(channels, kernel_size, device):
    original = timm.layers.EcaModule(channels=channels, kernel_size=kernel_size).to(device)
    check_converted(original, EcaModule, image(2, channels or 20, 3, 3, device=device, channels_last=True))


def test_timm_models_layers_convert():
    """The SE layers inside real timm models (as built by timm) are accepted by from_module."""
    for name, cls in (("seresnet18", SEModule), ("efficientnet_b0", EfficientNetSqueezeExcite),
                      ("mobilenetv3_small_050", EfficientNetSqueezeExcite), ("ese_vovnet19b_dw", EffectiveSEModule),
                      ("ecaresnet26t", EcaModule)):
        model = timm.create_model(name, pretrained=False)
        found = [m for m in model.modules()
                 if type(m).__name__ in ("SEModule", "SqueezeExcite", "EffectiveSEModule", "EcaModule")]
        assert found, name
        for m in found:
            assert isinstance(cls.from_module(m), cls)


def test_torchvision_models_layers_convert():
    models = pytest.importorskip("torchvision.models")
    model = models.mobilenet_v3_small()
    found = [m for m in model.modules() if isinstance(m, tv_ops.SqueezeExcitation)]
    assert found
    for m in found:
        fast = SqueezeExcite.from_module(m)
        assert shares_parameters(fast, m)


@pytest.mark.parametrize("ours,theirs", [
    (lambda: SqueezeExcite(24, 8), lambda: tv_ops.SqueezeExcitation(24, 8)),
    (lambda: SEModule(64, add_maxpool=True, norm_layer=nn.BatchNorm2d),
     lambda: timm.layers.SEModule(64, add_maxpool=True, norm_layer=nn.BatchNorm2d)),
    (lambda: SEModule(100, rd_ratio=0.3, bias=False), lambda: timm.layers.SEModule(100, rd_ratio=0.3, bias=False)),
    (lambda: EffectiveSEModule(24), lambda: timm.layers.EffectiveSEModule(24)),
    (lambda: EfficientNetSqueezeExcite(40, rd_ratio=0.25, act_layer=nn.SiLU),
     lambda: TimmBlockSE(40, rd_ratio=0.25, act_layer=nn.SiLU)),
    (lambda: EcaModule(channels=256), lambda: timm.layers.EcaModule(channels=256)),
], ids=["torchvision", "timm_se", "timm_se_ratio", "effective_se", "efficientnet_se", "eca"])
def test_constructors_build_the_originals_state_dict(ours, theirs):
    """Same arguments, same state_dict (keys and shapes): a checkpoint of one loads into the other,
    and then both compute the same thing."""
    mine, original = ours(), randomize(theirs()).eval()
    assert {k: v.shape for k, v in mine.state_dict().items()} == \
        {k: v.shape for k, v in original.state_dict().items()}
    mine.load_state_dict(original.state_dict())
    mine.eval()
    x = rand(2, next(original.parameters()).shape[1] if not isinstance(original, timm.layers.EcaModule) else 256, 3, 3)
    if isinstance(original, timm.layers.EffectiveSEModule) or isinstance(original, tv_ops.SqueezeExcitation):
        x = rand(2, 24, 3, 3)
    torch.testing.assert_close(mine(x), original(x), rtol=1e-4, atol=1e-5)
    original.load_state_dict(mine.state_dict())


def test_module_on_the_cpu_path_matches(monkeypatch):
    """The same module runs the reference when the backend says so (a model that uses attn_fast runs
    anywhere)."""
    original = randomize(timm.layers.SEModule(16, rd_channels=4, norm_layer=nn.BatchNorm2d)).eval()
    fast = SEModule.from_module(copy.deepcopy(original))
    x = rand(2, 16, 3, 3)
    attn_fast.set_backend("reference")
    torch.testing.assert_close(fast(x), original(x))


def test_autocast_casts_the_parameters_as_the_original_does(device):
    original = randomize(TimmBlockSE(16, rd_ratio=0.25)).to(device)
    fast = EfficientNetSqueezeExcite.from_module(copy.deepcopy(original))
    x = rand(2, 16, 3, 3, dtype=torch.bfloat16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got, want = fast(x), original(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


class _MyGate(nn.Module):
    def forward(self, x):
        return torch.sigmoid(2 * x)


class _OwnForward(timm.layers.SEModule):
    def forward(self, x):
        return x


@pytest.mark.parametrize("make,cls,match", [
    (lambda: timm.layers.SEModule(16, act_layer=nn.Tanh), SEModule, "Tanh"),
    (lambda: timm.layers.SEModule(16, act_layer=nn.PReLU), SEModule, "PReLU"),
    (lambda: timm.layers.SEModule(16, gate_layer=_MyGate), SEModule, "_MyGate"),
    (lambda: timm.layers.SEModule(16, gate_layer=nn.ReLU), SEModule, "gate must be a sigmoid"),
    (lambda: _OwnForward(16), SEModule, "overrides"),
    (lambda: timm.layers.EcaModule(channels=64, use_mlp=True), EcaModule, "use_mlp"),
    (lambda: timm.layers.SEModule(16), EcaModule, "expected a timm.layers.eca.EcaModule"),
    (lambda: tv_ops.SqueezeExcitation(16, 4, scale_activation=nn.Tanh), SqueezeExcite, "Tanh"),
], ids=["tanh", "prelu", "own_gate", "relu_gate", "own_forward", "eca_mlp", "wrong_class", "tv_tanh"])
def test_unsupported_layers_are_refused(make, cls, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        cls.from_module(make())


def test_non_pointwise_conv_is_refused():
    m = tv_ops.SqueezeExcitation(16, 4)
    m.fc1 = nn.Conv2d(16, 4, 1, padding=1)
    with pytest.raises(UnsupportedLayerError, match="plain 1x1 conv"):
        SqueezeExcite.from_module(m)


def test_constructor_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        SqueezeExcite(16, 4, activation="mish")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        EcaModule(kernel_size=4)
    with pytest.raises(UnsupportedLayerError, match="scale_activation"):
        SqueezeExcite(16, 4, scale_activation=nn.ReLU)


@pytest.mark.parametrize("train", [False, True], ids=["eval_folded", "train_batch_stats"])
def test_torch_compile_of_a_converted_module(train, device):
    original = randomize(timm.layers.SEModule(16, rd_channels=4, add_maxpool=True, norm_layer=nn.BatchNorm2d))
    original = original.to(device).train(train)
    eager = SEModule.from_module(copy.deepcopy(original))
    compiled_module = SEModule.from_module(copy.deepcopy(original))
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    x = rand(2, 16, 3, 3, device=device)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [eager(xs[0]), compiled(xs[1])]
    torch.testing.assert_close(ys[1], ys[0])
    for y in ys:
        y.square().sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad)
    torch.testing.assert_close(compiled_module.fc1.weight.grad, eager.fc1.weight.grad)
    torch.testing.assert_close(compiled_module.bn.running_mean, eager.bn.running_mean)


def test_pool_and_scale_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
        z, zmax = torch.ops.attn_fast.channel_pool(x, "avgmax")
        y = torch.ops.attn_fast.channel_scale(x, z)
    assert z.shape == zmax.shape == (2, 16) and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_functional_norm_argument_checks():
    x, w1, w2 = rand(2, 8, 3, 3), rand(4, 8), rand(8, 4)
    with pytest.raises(TypeError, match="norm must be a callable"):
        attn_fast.squeeze_excite(x, w1, fc2_weight=w2, norm=3)
    with pytest.raises(ValueError, match="norm needs a hidden layer"):
        attn_fast.squeeze_excite(x, rand(8, 8), norm=nn.BatchNorm2d(8))
