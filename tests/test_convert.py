"""attn_fast.convert and attn_fast.verify on whole models (timm's SE-ResNet and CBAM-ResNet with one
block per stage, LCNet, torch's nn.Transformer, a timm ViT) at tiny sizes, kernels interpreted: the
report names every swap, the converted model matches the float64 original by the numerics rule in
outputs, input and parameter gradients (verify's verdict, and its per-layer checks), state_dicts
round-trip, and layers the kernels do not cover are left alone and reported."""
import copy
import io
import logging

import pytest
import torch
from torch import nn

import attn_fast
from attn_fast import nn as fnn
from attn_fast.__main__ import main
from attn_fast.verify import randomize_zero_init
from numerics import rand

timm = pytest.importorskip("timm")


randomize = randomize_zero_init  # no zero-initialised gammas: the SE layers must not see zeros


def convert_copy(model, **kw):
    model = randomize(model)
    original = copy.deepcopy(model)
    converted, report = attn_fast.convert(model, report=True, **kw)
    return original, converted, report


#: one block per stage keeps the interpreted runs short (every stage's SE/CBAM is still swapped)
ONE_BLOCK = dict(layers=[1, 1, 1, 1])
TIMM_MODELS = {
    "seresnet18": (ONE_BLOCK, fnn.SEModule, 4),
    "resnet18_cbam": (dict(ONE_BLOCK, block_args=dict(attn_layer="cbam")), fnn.CBAM, 4),
    "lcnet_035": ({}, fnn.EfficientNetSqueezeExcite, 2),
}  # LCNet's SE is MobileNetV3's / EfficientNet's block SqueezeExcite (whole models: test_se_modules.py)


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_model_converts_and_verifies(name):
    kwargs, cls, count = TIMM_MODELS[name]
    model = timm.create_model(name.replace("_cbam", ""), pretrained=False, **kwargs).eval()
    original, converted, report = convert_copy(model)
    assert converted is model
    assert len(report.swapped) == count and not report.skipped, str(report)
    assert all(s.replacement == f"attn_fast.nn.{cls.__name__}" for s in report.swapped)
    assert sum(isinstance(m, cls) for m in converted.modules()) == count
    result = attn_fast.verify(original, converted, rand(2, 3, 32, 32))
    assert result.passed, str(result)
    assert set(result.layers) == {s.name for s in report.swapped}
    for layer in result.layers:  # per-layer output and parameter gradients were compared
        scope = result.for_scope(layer)
        assert any(c.what == "output" for c in scope) and any(c.what.startswith("grad") for c in scope)
    assert any(c.what == "grad input 0" for c in result.for_scope("model"))


@pytest.mark.parametrize("dtype_case", [torch.bfloat16])  # fp16 per layer: test_se_modules/test_cbam_modules
def test_timm_model_in_16_bit(dtype_case):
    """Every swapped layer passes its isolated checks and the model's output its check; whole-model
    gradients are reported, not judged, in 16-bit (see attn_fast.verify)."""
    model = timm.create_model("seresnet18", pretrained=False, **ONE_BLOCK).eval()
    original, converted, _ = convert_copy(model)
    result = attn_fast.verify(original, converted, rand(2, 3, 32, 32), dtype=dtype_case)
    assert result.passed, str(result)
    judged = [c for c in result.checks if c.scope != "model" and c.what.startswith("grad")]
    assert len(judged) >= 4 * 5 and all(c.passed and not c.detail for c in judged)


def test_training_mode_model_fp32():
    """Training mode: BatchNorm batch statistics (also inside CBAM's spatial half) over enough values
    to be well conditioned (a deep timm model at a tiny input size normalises over 2 values)."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), timm.layers.SEModule(16, rd_channels=4),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), timm.layers.cbam.CbamModule(32, rd_channels=8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).train()
    original, converted, report = convert_copy(model)
    assert len(report.swapped) == 2
    result = attn_fast.verify(original, converted, rand(4, 3, 8, 8))
    assert result.passed, str(result)


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_converts_and_verifies(batch_first):
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32,
                           dropout=0.0, batch_first=batch_first).eval()
    original, converted, report = convert_copy(model)
    assert len(report.swapped) == 2 + 2  # encoder self-attention x2, decoder self- and cross-attention
    assert all(isinstance(m.self_attn, fnn.MultiheadAttention) for m in converted.encoder.layers)
    assert isinstance(converted.decoder.layers[0].multihead_attn, fnn.MultiheadAttention)
    src, tgt = (rand(2, 6, 16), rand(2, 4, 16)) if batch_first else (rand(6, 2, 16), rand(4, 2, 16))
    result = attn_fast.verify(original, converted, (src, tgt))
    assert result.passed, str(result)


def test_timm_vit_converts_and_verifies():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    original, converted, report = convert_copy(model)
    assert [s.name for s in report.swapped] == ["blocks.0.attn", "blocks.1.attn"], str(report)
    assert all(isinstance(b.attn, fnn.VitAttention) for b in converted.blocks)
    result = attn_fast.verify(original, converted, rand(2, 3, 32, 32))
    assert result.passed, str(result)


def test_converted_layers_run_the_kernel(monkeypatch):
    """The swapped MultiheadAttention reaches the fused op (not torch's path)."""
    calls = []
    real = attn_fast.functional.scaled_dot_product_attention
    monkeypatch.setattr(attn_fast.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0)
    attn_fast.convert(layer)(rand(5, 2, 16))
    assert calls


def test_state_dict_round_trips():
    """A checkpoint of the original loads into the converted model and back: same keys, same tensors."""
    model = randomize(timm.create_model("seresnet18", pretrained=False, block_args=dict(attn_layer="cbam"),
                                        **ONE_BLOCK)).eval()
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    keys = list(model.state_dict())
    converted = attn_fast.convert(copy.deepcopy(model))
    assert list(converted.state_dict()) == keys
    saved.seek(0)
    converted.load_state_dict(torch.load(saved))
    back = timm.create_model("seresnet18", pretrained=False, block_args=dict(attn_layer="cbam"), **ONE_BLOCK).eval()
    back.load_state_dict(converted.state_dict())
    x = rand(1, 3, 32, 32)
    torch.testing.assert_close(back(x), model(x))
    torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


def test_parameters_are_shared_so_optimizers_keep_working():
    model = timm.create_model("lcnet_035", pretrained=False)
    before = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attn_fast.convert(model)
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items()) and len(after) == len(before)
    model(rand(2, 3, 32, 32)).sum().backward()
    se = model.blocks[5][0].se
    w0 = se.conv_reduce.weight.detach().clone()
    opt.step()
    assert not torch.equal(se.conv_reduce.weight, w0)


def test_include_exclude_and_unsupported_layers_are_reported(caplog):
    model = nn.Sequential(
        timm.layers.SEModule(16, rd_channels=4),
        timm.layers.SEModule(16, rd_channels=4, act_layer=timm.layers.get_act_layer("tanh")),
        nn.Sequential(timm.layers.EcaModule(channels=16), timm.layers.cbam.CbamModule(16, rd_channels=4)),
    )
    with caplog.at_level(logging.INFO, logger="attn_fast.convert"):
        _, report = attn_fast.convert(copy.deepcopy(model), report=True)
    assert [s.name for s in report.swapped] == ["0", "2.0", "2.1"]
    assert [s.name for s in report.skipped] == ["1"] and "Tanh" in report.skipped[0].reason
    assert "swapped 0" in caplog.text and "left 1" in caplog.text
    _, report = attn_fast.convert(copy.deepcopy(model), include="2.*", report=True)
    assert [s.name for s in report.swapped] == ["2.0", "2.1"]
    _, report = attn_fast.convert(copy.deepcopy(model), exclude=[timm.layers.cbam.CbamModule, "0"], report=True)
    assert [s.name for s in report.swapped] == ["2.0"]
    assert {s.reason for s in report.skipped} >= {"excluded"}
    _, report = attn_fast.convert(copy.deepcopy(model), include=lambda name, m: name.endswith("0"), report=True)
    assert [s.name for s in report.swapped] == ["0", "2.0"]
    with pytest.raises(TypeError, match="include/exclude"):
        attn_fast.convert(copy.deepcopy(model), include=3)


def test_shared_layer_root_layer_and_idempotence():
    se = timm.layers.SEModule(8, rd_channels=2)
    model = nn.Sequential(se, nn.Identity(), se)
    converted, report = attn_fast.convert(model, report=True)
    assert converted[0] is converted[2] and isinstance(converted[0], fnn.SEModule)
    assert len(report.swapped) == 1 and report.swapped[0].name == "0, 2"
    _, again = attn_fast.convert(converted, report=True)
    assert not again.swapped and not again.skipped
    root = attn_fast.convert(nn.MultiheadAttention(8, 2))
    assert isinstance(root, fnn.MultiheadAttention)
    with pytest.raises(TypeError, match="nn.Module"):
        attn_fast.convert("model")


def test_verify_catches_a_wrong_conversion():
    """verify is not a rubber stamp: a converted layer with a perturbed weight fails its checks."""
    model = randomize(timm.create_model("lcnet_035", pretrained=False)).eval()
    original = copy.deepcopy(model)
    converted = attn_fast.convert(model)
    with torch.no_grad():
        converted.blocks[5][0].se.conv_reduce.weight.mul_(1.01)
    result = attn_fast.verify(original, converted, rand(2, 3, 32, 32))
    assert not result.passed
    assert any(not c.passed for c in result.for_scope("blocks.5.0.se"))
    assert "FAIL" in str(result)


def test_command_line_verify(capsys):
    rc = main(["verify", "lcnet_035", "--size", "32", "--batch", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 layer(s) swapped" in out and "PASS" in out
    with pytest.raises(SystemExit) as exc:  # an argparse error (exit status 2) naming the argument
        main(["verify", "no_such_model_xyz"])
    assert exc.value.code == 2 and "argument model: timm cannot build" in capsys.readouterr().err


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal"])
def test_vit_attention_masks_and_qk_norm(mask):
    """VitAttention.from_module against timm's Attention (with q/k norms) on timm's own mask conventions."""
    from timm.layers.attention import Attention

    original = Attention(16, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    randomize(original)
    fast = fnn.VitAttention.from_module(copy.deepcopy(original))
    assert list(fast.state_dict()) == list(original.state_dict())
    x = rand(2, 5, 16)
    kw = {"none": {}, "causal": dict(is_causal=True),
          "bool": dict(attn_mask=(torch.rand(2, 1, 5, 5) < 0.7) | torch.eye(5, dtype=torch.bool)),
          "float": dict(attn_mask=rand(2, 2, 5, 5))}[mask]
    torch.testing.assert_close(fast(x, **kw), original(x, **kw), rtol=1e-5, atol=1e-5)
