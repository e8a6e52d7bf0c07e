"""CBAM op: the registered differentiable Triton op and its dispatch.

``attn_fast::cbam_fwd`` and ``attn_fast::cbam_bwd`` are functional ``torch.library.custom_op``s
(opaque to the compiler, with fake implementations). The passes over x and dy are Triton kernels
(kernels/cbam.py); the MLP forward is the SE GEMM kernel; the small tensors in between (the (N, C)
MLP backward, and the k x k conv, BatchNorm and gate on the (N, 1|2, H, W) maps, both directions)
run in fp32 with torch's own operators inside the ops. BatchNorm's running statistics are updated by
the Python wrapper from the batch statistics the op returns (a custom op with autograd must not
mutate its inputs), as ``nn.BatchNorm2d`` updates them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..dispatch import route
from ..reference import gate_fn
from .squeeze_excite import _vjp, empty_grad, empty_like_output, sample_too_large

OP = "cbam"
_aten = torch.ops.aten


def _maps(mean_c: Tensor, max_c: Tensor, shape, light: bool, spatial_order: str) -> Tensor:
    """The conv's input (N, 1|2, H, W) fp32 from the per-position channel mean and max."""
    n, _, hh, ww = shape
    mean_c, max_c = mean_c.view(n, 1, hh, ww), max_c.view(n, 1, hh, ww)
    if light:
        return 0.5 * mean_c + 0.5 * max_c
    return torch.cat([mean_c, max_c] if spatial_order == "mean_max" else [max_c, mean_c], dim=1)


def _conv_out64(logits: Tensor, conv_bias: Optional[Tensor]) -> Tensor:
    """The spatial conv's output in float64: ``logits`` (the conv without its bias, fp32) plus the bias."""
    out = logits.double()
    return out if conv_bias is None else out + conv_bias.double().reshape(())


def _bn_input_to_gate(logits: Tensor, conv_bias: Optional[Tensor], stats: Tensor, bn_weight: Optional[Tensor],
                      bn_bias: Optional[Tensor], use_bn: bool) -> Tuple[Optional[Tensor], Tensor]:
    """(normed, gate input) from the bias-free conv output ``logits``: normed is the BatchNorm's
    (conv output - mean) * invstd in float64 (``_bn_stats``; None without a BatchNorm), the gate
    input fp32."""
    if not use_bn:
        return None, logits if conv_bias is None else logits + conv_bias.float()
    normed = (_conv_out64(logits, conv_bias) - stats[0]) * stats[1]
    out = normed.float()
    if bn_weight is not None:
        out = out * bn_weight.float()
    if bn_bias is not None:
        out = out + bn_bias.float()
    return normed, out


def _bn_stats(logits: Tensor, conv_bias: Optional[Tensor], bn_training: bool, bn_running_mean: Optional[Tensor],
              bn_running_var: Optional[Tensor], bn_eps: float) -> Tensor:
    """[mean, invstd, unbiased var] of the spatial BatchNorm, float64: the batch statistics of the
    conv output in training mode, the running ones in eval.

    Training-mode BatchNorm's backward relies on the normed map having zero mean exactly (its
    output is blind to a shift of its input), and the conv weight's and bias's gradients are what
    is left of that cancellation, sums over every position. A mean or a conv output rounded to
    fp32 where the map's spread is small against its offset (a small conv weight, a bias near 1)
    breaks it: those gradients came out at 8x and more of the fp32 reference's error (found by the
    fuzz profile). So the conv runs in fp32 without its bias (its output then has the spread's
    scale, not the offset's), and the bias, the statistics and the normalisation are float64. The
    map is (N, 1, H, W), C times smaller than x: the float64 passes cost next to nothing."""
    if bn_training:
        l64 = _conv_out64(logits, conv_bias)
        count = l64.numel()
        var = l64.var(unbiased=False)
        return torch.stack([l64.mean(), torch.rsqrt(var + bn_eps), var * count / max(count - 1, 1)])
    mean, var = bn_running_mean.double().reshape(()), bn_running_var.double().reshape(())
    return torch.stack([mean, torch.rsqrt(var + bn_eps), var])


@torch.library.custom_op("attn_fast::cbam_fwd", mutates_args=())
def cbam_fwd(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
             fc2_bias: Optional[Tensor], conv_weight: Tensor, conv_bias: Optional[Tensor],
             bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], bn_running_mean: Optional[Tensor],
             bn_running_var: Optional[Tensor], activation: str, gate: str, channel_gate: str, light: bool,
             spatial_order: str, use_bn: bool, bn_training: bool, bn_eps: float) -> Tuple[
                 Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, avg, zmax, pre1, h, pre, ca, mean_c, max_c, cnt, logits, sa, bn_stats): the output and what
    the backward needs (fp32 but y and bn_stats); logits is the spatial conv's output without its
    bias; bn_stats = [mean, invstd, unbiased var] of the BatchNorm in float64 (batch statistics in
    training mode, running ones in eval; ``_bn_stats``), empty without one."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels import cbam as K

        n, c, hh, ww = x.shape
        avg, zmax = K.channel_pools(x)
        if light:
            m = K.mlp(0.5 * avg + 0.5 * zmax, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation)
            pre = m["out"]
        else:
            m = K.mlp(torch.cat([avg, zmax]), fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation)
            pre = m["out"][:n] + m["out"][n:]
        ca = gate_fn(channel_gate)(pre).contiguous()
        mean_c, max_c, cnt = K.spatial_stats(x, ca)
        k = conv_weight.shape[-1]
        # the conv without its bias (see _bn_stats); _conv_out64 / _bn_input_to_gate add it
        logits = F.conv2d(_maps(mean_c, max_c, x.shape, light, spatial_order), conv_weight.float(), None,
                          padding=k // 2)
        stats = (_bn_stats(logits, conv_bias, bn_training, bn_running_mean, bn_running_var, bn_eps) if use_bn
                 else x.new_empty((0,), dtype=torch.float64))
        _, gate_in = _bn_input_to_gate(logits, conv_bias, stats, bn_weight, bn_bias, use_bn)
        sa = gate_fn(gate)(gate_in).reshape(n, hh * ww).contiguous()
        y = K.apply_gates(x, ca, sa)
        return y, avg, zmax, m["pre1"], m["h"], pre, ca, mean_c, max_c, cnt, logits, sa, stats


@cbam_fwd.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias, bn_running_mean,
      bn_running_var, activation, gate, channel_gate, light, spatial_order, use_bn, bn_training, bn_eps):
    n, c, hh, ww = x.shape
    rows = n if light else 2 * n
    cr = fc1_weight.shape[0]

    def f32(*shape):
        return x.new_empty(shape, dtype=torch.float32)

    return (empty_like_output(x), f32(n, c), f32(n, c), f32(rows, cr), f32(rows, cr), f32(n, c), f32(n, c),
            f32(n, hh * ww), f32(n, hh * ww), f32(n, hh * ww), f32(n, 1, hh, ww), f32(n, hh * ww),
            x.new_empty((3 if use_bn else 0,), dtype=torch.float64))


@torch.library.custom_op("attn_fast::cbam_bwd", mutates_args=())
def cbam_bwd(dy: Tensor, x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
             fc2_bias: Optional[Tensor], conv_weight: Tensor, conv_bias: Optional[Tensor],
             bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], avg: Tensor, zmax: Tensor, pre1: Tensor,
             h: Tensor, pre: Tensor, ca: Tensor, mean_c: Tensor, max_c: Tensor, cnt: Tensor, logits: Tensor,
             sa: Tensor, stats: Tensor, activation: str, gate: str, channel_gate: str, light: bool,
             spatial_order: str, use_bn: bool, bn_training: bool) -> Tuple[
                 Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias, d conv_weight, d conv_bias,
    d bn_weight, d bn_bias); absent parameters get empty tensors."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels import cbam as K

        n, c, hh, ww = x.shape
        hw = hh * ww
        dsa, dca, ties = K.backward_gates(dy, x, ca, sa, zmax)
        # The spatial half on the maps: gate, BatchNorm (its statistics' part in float64), conv (fp32).
        normed64, gate_in = _bn_input_to_gate(logits, conv_bias, stats, bn_weight, bn_bias, use_bn)
        dgate_in = _vjp(gate, gate_in, dsa.view(n, 1, hh, ww))
        dbn_w = dbn_b = None
        if use_bn:
            if bn_weight is not None:
                dbn_w = (dgate_in * normed64.float()).sum().reshape(1)
            if bn_bias is not None:
                dbn_b = dgate_in.sum().reshape(1)
            dnormed = dgate_in * bn_weight.float() if bn_weight is not None else dgate_in
            if bn_training:  # through the batch mean and variance too
                # float64, as the statistics: the sum of dlogits (the conv bias's gradient) is exactly 0
                d64 = dnormed.double()
                dlogits = (stats[1] * (d64 - d64.mean() - normed64 * (d64 * normed64).mean())).float()
            else:
                dlogits = dnormed * stats[1].float()
        else:
            dlogits = dgate_in
        k = conv_weight.shape[-1]
        maps = _maps(mean_c, max_c, x.shape, light, spatial_order)
        w32 = conv_weight.float()
        dmaps, dconv_w, dconv_b = _aten.convolution_backward(
            dlogits, maps, w32, [1] if conv_bias is not None else None, [1, 1], [k // 2, k // 2], [1, 1], False,
            [0, 0], 1, [True, True, conv_bias is not None])
        if light:
            dmean = dmax = 0.5 * dmaps[:, 0]
        else:
            first, second = dmaps[:, 0], dmaps[:, 1]
            dmean, dmax = (first, second) if spatial_order == "mean_max" else (second, first)
        dmean = (dmean.reshape(n, hw) / c).contiguous()
        dmax = (dmax.reshape(n, hw) / cnt).contiguous()
        dca = dca + K.backward_stats(x, ca, dmean, dmax, max_c)
        # The channel half: gate and the shared MLP on (N or 2N, C) rows.
        dpre = _vjp(channel_gate, pre, dca)
        if light:
            dout, z = dpre, 0.5 * avg + 0.5 * zmax
        else:
            dout, z = torch.cat([dpre, dpre]), torch.cat([avg, zmax])
        w1 = fc1_weight.reshape(fc1_weight.shape[0], -1).float()
        w2 = fc2_weight.reshape(fc2_weight.shape[0], -1).float()
        dw2, db2 = dout.t() @ h, dout.sum(0)
        dpre1 = _vjp(activation, pre1, dout @ w2)
        dw1, db1 = dpre1.t() @ z, dpre1.sum(0)
        dz = dpre1 @ w1
        davg, dzm = (0.5 * dz, 0.5 * dz) if light else (dz[:n], dz[n:])
        dx = K.backward_input(dy, x, ca, sa, dmean, dmax, max_c, (davg / hw).contiguous(), (dzm / ties).contiguous(),
                              zmax)

        def like(grad: Optional[Tensor], param: Optional[Tensor]) -> Tensor:
            if param is None or grad is None:  # a fresh empty each time: op outputs must not alias
                return x.new_empty((0,))
            return grad.reshape(param.shape).to(param.dtype)

        return (dx, like(dw1, fc1_weight), like(db1, fc1_bias), like(dw2, fc2_weight), like(db2, fc2_bias),
                like(dconv_w, conv_weight), like(dconv_b, conv_bias), like(dbn_w, bn_weight), like(dbn_b, bn_bias))


@cbam_bwd.register_fake
def _(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias, *rest):
    return (empty_like_output(x),) + tuple(empty_grad(t, x) for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                                      conv_weight, conv_bias, bn_weight, bn_bias))


def _setup_context(ctx, inputs, output):
    (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias, _rm, _rv,
     activation, gate, channel_gate, light, spatial_order, use_bn, bn_training, _eps) = inputs
    _, avg, zmax, pre1, h, pre, ca, mean_c, max_c, cnt, logits, sa, stats = output
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias,
                          avg, zmax, pre1, h, pre, ca, mean_c, max_c, cnt, logits, sa, stats)
    ctx.args = (activation, gate, channel_gate, light, spatial_order, use_bn, bn_training)


def _backward(ctx, dy, *unused):
    grads = cbam_bwd(dy, *ctx.saved_tensors, *ctx.args)
    need = ctx.needs_input_grad
    # inputs: x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, conv_b, bn_w, bn_b, then 10 without gradients
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,) * 10


cbam_fwd.register_autograd(_backward, setup_context=_setup_context)


def cbam(x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, conv_weight: Tensor, fc1_bias: Optional[Tensor] = None,
         fc2_bias: Optional[Tensor] = None, conv_bias: Optional[Tensor] = None, *, activation: str = "relu",
         gate: str = "sigmoid", channel_gate: Optional[str] = None, light: bool = False,
         spatial_order: str = "mean_max", bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
         bn_running_mean: Optional[Tensor] = None, bn_running_var: Optional[Tensor] = None,
         bn_training: bool = False, bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> Tensor:
    path = route(OP, x.device, x.dtype, unsupported=sample_too_large(x),
                 tensors=(x, fc1_weight, fc2_weight, conv_weight, fc1_bias, fc2_bias, conv_bias, bn_weight, bn_bias,
                          bn_running_mean, bn_running_var))
    if path.path != "triton" or x.numel() == 0:
        return reference.cbam(
            x, fc1_weight, fc2_weight, conv_weight, fc1_bias, fc2_bias, conv_bias, activation=activation, gate=gate,
            channel_gate=channel_gate, light=light, spatial_order=spatial_order, bn_weight=bn_weight,
            bn_bias=bn_bias, bn_running_mean=bn_running_mean, bn_running_var=bn_running_var,
            bn_training=bn_training, bn_momentum=bn_momentum, bn_eps=bn_eps)
    use_bn = bn_weight is not None or bn_running_mean is not None
    cgate = channel_gate or ("sigmoid" if light else gate)
    out = cbam_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, bn_weight, bn_bias,
                   bn_running_mean, bn_running_var, activation, gate, cgate, light, spatial_order, use_bn,
                   bn_training, float(bn_eps))
    if use_bn and bn_training and bn_running_mean is not None:
        stats = out[-1].detach()
        with torch.no_grad():  # as nn.BatchNorm2d: running = (1 - momentum) * running + momentum * batch
            for buf, value in ((bn_running_mean, stats[0]), (bn_running_var, stats[2])):
                buf.copy_(((1.0 - bn_momentum) * buf.float() + bn_momentum * value).to(buf.dtype))
    return out[0]
