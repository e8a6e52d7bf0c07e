"""attn_fast.nn.CBAM against timm's CbamModule and LightCbamModule: ``from_module`` keeps the
original's submodules (same state_dict keys and tensors), the constructor builds the same
state_dict, and outputs, input and parameter gradients and the BatchNorm buffers (running
statistics, batch count) match the original run in float64 by the numerics rule."""
import copy

import pytest
import torch
from torch import nn

from attn_fast.nn import CBAM, UnsupportedLayerError
from numerics import rand
from test_se_modules import check_converted, image, randomize, shares_parameters

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule, LightCbamModule  # noqa: E402


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("cls", [CbamModule, LightCbamModule], ids=["cbam", "light"])
def test_timm_cbam_eval(cls, channels_last, dtype, device):
    original = cls(32, spatial_kernel_size=3).to(device)
    fast = check_converted(original, CBAM, image(2, 32, 5, 6, dtype, device, channels_last))
    assert fast.light == (cls is LightCbamModule)


@pytest.mark.parametrize("cls", [CbamModule, LightCbamModule], ids=["cbam", "light"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_timm_cbam_training_updates_batchnorm(cls, momentum, device):
    original = cls(24, rd_ratio=0.25, act_layer=nn.SiLU, mlp_bias=True).to(device)
    original.spatial.conv.bn.momentum = momentum
    check_converted(original, CBAM, image(3, 24, 4, 5, device=device, channels_last=True), train=True)
    # two steps each: the batch count and running statistics evolve as the original's
    fast = CBAM.from_module(copy.deepcopy(original))
    x = rand(3, 24, 4, 5, device=device)
    for _ in range(2):
        want, got = original(x), fast(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    bn, bn_fast = original.spatial.conv.bn, fast.spatial.conv.bn
    assert int(bn_fast.num_batches_tracked) == int(bn.num_batches_tracked) == 2
    torch.testing.assert_close(bn_fast.running_mean, bn.running_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn_fast.running_var, bn.running_var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
def test_timm_cbam_gates_and_activations(gate, device):
    original = CbamModule(40, rd_channels=5, spatial_kernel_size=5, act_layer=timm.layers.get_act_layer("gelu"), gate_layer=gate).to(device)
    check_converted(original, CBAM, image(2, 40, 3, 7, torch.bfloat16, device))


def test_from_module_shares_everything():
    original = CbamModule(32)
    fast = CBAM.from_module(original)
    assert shares_parameters(fast, original)
    assert fast.spatial.conv.bn.running_mean is original.spatial.conv.bn.running_mean
    assert list(fast.state_dict()) == list(original.state_dict())


@pytest.mark.parametrize("light", [False, True], ids=["cbam", "light"])
def test_constructor_builds_the_originals_state_dict(light):
    kwargs = dict(rd_ratio=0.25, spatial_kernel_size=5, mlp_bias=True)
    mine = CBAM(48, light=light, **kwargs)
    original = randomize((LightCbamModule if light else CbamModule)(48, **kwargs)).eval()
    assert {k: v.shape for k, v in mine.state_dict().items()} == \
        {k: v.shape for k, v in original.state_dict().items()}
    mine.load_state_dict(original.state_dict())
    mine.eval()
    x = rand(2, 48, 4, 4)
    torch.testing.assert_close(mine(x), original(x), rtol=1e-4, atol=1e-5)


def test_timm_model_with_cbam_blocks_converts():
    model = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer="cbam"))
    found = [m for m in model.modules() if isinstance(m, CbamModule)]
    assert found
    for m in found:
        assert isinstance(CBAM.from_module(m), CBAM)


def test_unsupported_cbam_layers_are_refused():
    m = CbamModule(16, act_layer=timm.layers.get_act_layer("tanh"))
    with pytest.raises(UnsupportedLayerError, match="Tanh"):
        CBAM.from_module(m)
    m = CbamModule(16)
    m.spatial.conv.bn.act = nn.ReLU()
    with pytest.raises(UnsupportedLayerError, match="act must be Identity"):
        CBAM.from_module(m)
    m = CbamModule(16)
    m.spatial.conv.conv = nn.Conv2d(2, 1, 7, padding=2, bias=False)
    with pytest.raises(UnsupportedLayerError, match="k x k conv"):
        CBAM.from_module(m)
    with pytest.raises(ValueError, match="odd"):
        CBAM(16, spatial_kernel_size=4)


def test_module_on_the_reference_path_and_under_autocast(device):
    import attn_fast

    original = randomize(CbamModule(16, rd_channels=4, spatial_kernel_size=3)).to(device).eval()
    fast = CBAM.from_module(copy.deepcopy(original))
    x = rand(2, 16, 3, 3, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got, want = fast(x.bfloat16()), original(x.bfloat16())
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    attn_fast.set_backend("reference")
    torch.testing.assert_close(fast(x), original(x))
