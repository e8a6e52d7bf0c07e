"""Squeeze-and-excitation op: the registered differentiable Triton op and its dispatch.

``attn_fast::se_fwd`` and ``attn_fast::se_bwd`` are ``torch.library.custom_op``s (opaque to the
compiler, with fake implementations). The heavy passes over x and dy are Triton kernels
(kernels/squeeze_excite.py); the MLP forward is a Triton GEMM with fused bias and activation, and
its backward, on (N, C)-sized tensors, runs inside ``se_bwd`` with torch ops in fp32 (the exact
derivatives torch defines for each activation and gate).
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..dispatch import route
from ..reference.squeeze_excite import excite
from . import squeeze_excite_cpu

OP = "squeeze_excite"
ECA_OP = "efficient_channel_attention"
_FWD_OUTPUTS = ("y", "z", "zmax", "pre1", "h", "pre2", "s")

#: The SE/ECA/CBAM kernels index within one sample in int32 (the sample offset is 64-bit): a sample
#: of more elements than this, counting the last tiles' masked lanes, runs the reference instead
#: (with a one-time warning).
INT32_OFFSET_LIMIT = 2 ** 31 - 1


def sample_too_large(x: Tensor) -> Optional[str]:
    """Why the kernels cannot take x (N, C, H, W) (None when they can): C * H * W near 2**31."""
    c, hw = x.shape[1], x.shape[2] * x.shape[3]
    if (c + 64) * (hw + 128) > INT32_OFFSET_LIMIT:
        return f"samples of 2**31 elements or more (C * H * W = {c * hw})"
    return None


def empty_like_output(x: Tensor) -> Tensor:
    """An empty tensor laid out as the kernels lay out an output (or dx) of x's shape
    (kernels.squeeze_excite.as_nc_hw): x's strides when x is NCHW- or channels_last-contiguous,
    NCHW-contiguous for any other layout (a permuted, sliced or expanded x is copied to NCHW first).
    The fake implementations use it: ``torch.empty_like`` would keep a permuted x's strides."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x)
    return x.new_empty(x.shape)


def empty_grad(t: Optional[Tensor], x: Tensor) -> Tensor:
    """The fake of a parameter's gradient: contiguous in ``t``'s shape and dtype (the ops reshape a
    fresh result), an empty (0,) tensor of x's dtype when the parameter is absent."""
    return x.new_empty((0,)) if t is None else t.new_empty(t.shape)


@torch.library.custom_op("attn_fast::se_fwd", mutates_args=())
def se_fwd(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor],
           fc2_bias: Optional[Tensor], activation: str, gate: str,
           pool: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, z, zmax, pre1, h, pre2, s) from the Triton forward (kernels.squeeze_excite.se_forward)."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.squeeze_excite import se_forward

        out = se_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, pool)
        return tuple(out[k] for k in _FWD_OUTPUTS)


@se_fwd.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, pool):
    n, c = x.shape[:2]
    cr = fc1_weight.shape[0]
    f32 = dict(dtype=torch.float32)
    empty = x.numel() == 0  # the launcher runs no excitation then: pre1, h, pre2, s come back (0,)
    hidden = (n, cr) if fc2_weight is not None and not empty else (0,)
    rows = (0,) if empty else (n, c)
    return (empty_like_output(x), x.new_empty((n, c), **f32), x.new_empty((n, c) if pool == "avgmax" else (0,), **f32),
            x.new_empty(hidden, **f32), x.new_empty(hidden, **f32), x.new_empty(rows, **f32), x.new_empty(rows, **f32))


@torch.library.custom_op("attn_fast::se_bwd", mutates_args=())
def se_bwd(dy: Tensor, x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor],
           fc2_bias: Optional[Tensor], z: Tensor, zmax: Tensor, pre1: Tensor, h: Tensor, pre2: Tensor, s: Tensor,
           activation: str, gate: str, pool: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias); absent parameters get empty tensors."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.squeeze_excite import se_grad_input, se_reduce_grad

        g, cnt = se_reduce_grad(dy, x, zmax)                     # dL/ds, (N, C) fp32
        dpre2 = _vjp(gate, pre2, g)
        w1 = fc1_weight.reshape(fc1_weight.shape[0], -1).float()
        if fc2_weight is not None:
            w2 = fc2_weight.reshape(fc2_weight.shape[0], -1).float()
            dw2, db2 = dpre2.t() @ h, dpre2.sum(0)
            dpre1 = _vjp(activation, pre1, dpre2 @ w2)
        else:
            dpre1 = dpre2
        dw1, db1 = dpre1.t() @ z, dpre1.sum(0)
        dz = dpre1 @ w1                                          # (N, C)
        hw = x.shape[2] * x.shape[3]
        if pool == "avgmax":
            dz_avg, dz_max = 0.5 * dz / hw, 0.5 * dz / cnt
        else:
            dz_avg, dz_max = dz / hw, dz.new_empty((0,))
        dx = se_grad_input(dy, x, s, dz_avg.contiguous(), dz_max.contiguous(), zmax)
        def empty():  # a fresh one each time: the op's outputs must not alias each other
            return x.new_empty((0,))

        return (dx, dw1.reshape(fc1_weight.shape).to(fc1_weight.dtype),
                empty() if fc1_bias is None else db1.to(fc1_bias.dtype),
                empty() if fc2_weight is None else dw2.reshape(fc2_weight.shape).to(fc2_weight.dtype),
                empty() if fc2_bias is None else db2.to(fc2_bias.dtype))


@se_bwd.register_fake
def _(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, z, zmax, pre1, h, pre2, s, activation, gate, pool):
    return (empty_like_output(x), empty_grad(fc1_weight, x), empty_grad(fc1_bias, x), empty_grad(fc2_weight, x),
            empty_grad(fc2_bias, x))


_aten = torch.ops.aten
#: grad * f'(pre) for every activation and gate, by torch's own backward kernels (so the derivative at
#: every point, kinks included, is the one autograd gives the reference).
_DERIVATIVES = {
    "identity": lambda g, pre: g,
    "relu": lambda g, pre: _aten.threshold_backward(g, pre, 0),
    "relu6": lambda g, pre: _aten.hardtanh_backward(g, pre, 0.0, 6.0),
    "silu": lambda g, pre: _aten.silu_backward(g, pre),
    "gelu": lambda g, pre: _aten.gelu_backward(g, pre, approximate="none"),
    "gelu_tanh": lambda g, pre: _aten.gelu_backward(g, pre, approximate="tanh"),
    "hardswish": lambda g, pre: _aten.hardswish_backward(g, pre),
    "sigmoid": lambda g, pre: _aten.sigmoid_backward(g, torch.sigmoid(pre)),
    "hardsigmoid": lambda g, pre: _aten.hardsigmoid_backward(g, pre),
}


def _vjp(name: str, pre: Tensor, grad: Tensor) -> Tensor:
    """grad * f'(pre) for the activation or gate called ``name`` ((N, K) fp32 tensors)."""
    return _DERIVATIVES[name](grad, pre)


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, pool = inputs
    _, z, zmax, pre1, h, pre2, s = output
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, z, zmax, pre1, h, pre2, s)
    ctx.args = (activation, gate, pool)


def _backward(ctx, dy, *unused):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, z, zmax, pre1, h, pre2, s = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = se_bwd(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, z, zmax, pre1, h, pre2, s,
                                    *ctx.args)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dw1 if need[1] else None, db1 if need[2] else None,
            dw2 if need[3] else None, db2 if need[4] else None, None, None, None)


se_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("attn_fast::eca_fwd", mutates_args=())
def eca_fwd(x: Tensor, conv_weight: Tensor, gate: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, pre, s) from the Triton ECA forward (kernels.squeeze_excite.eca_forward)."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.squeeze_excite import eca_forward

        out = eca_forward(x, conv_weight, gate)
        return out["y"], out["z"], out["pre"], out["s"]


@eca_fwd.register_fake
def _(x, conv_weight, gate):
    n, c = x.shape[:2]
    rows = (0,) if x.numel() == 0 else (n, c)  # the launcher runs no conv on an empty x: pre, s come back (0,)
    return (empty_like_output(x), x.new_empty((n, c), dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("attn_fast::eca_bwd", mutates_args=())
def eca_bwd(dy: Tensor, x: Tensor, conv_weight: Tensor, z: Tensor, pre: Tensor, s: Tensor,
            gate: str) -> Tuple[Tensor, Tensor]:
    """(dx, d conv_weight): the passes over dy and x in Triton, the 1-D convolution's backward
    (transposed convolution and weight gradient) with torch ops in fp32 on (N, C) tensors."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.squeeze_excite import se_grad_input, se_reduce_grad

        k = conv_weight.numel()
        empty = x.new_empty((0,), dtype=torch.float32)
        g, _ = se_reduce_grad(dy, x, empty)
        dpre = _vjp(gate, pre, g)[:, None, :]                    # (N, 1, C)
        w = conv_weight.reshape(1, 1, k).float()
        dz = torch.nn.functional.conv_transpose1d(dpre, w, padding=(k - 1) // 2)[:, 0]
        dw = torch.nn.grad.conv1d_weight(z[:, None, :], w.shape, dpre, padding=(k - 1) // 2)
        dx = se_grad_input(dy, x, s, (dz / (x.shape[2] * x.shape[3])).contiguous(), empty, empty.clone())
        return dx, dw.reshape(conv_weight.shape).to(conv_weight.dtype)


@eca_bwd.register_fake
def _(dy, x, conv_weight, z, pre, s, gate):
    return empty_like_output(x), empty_grad(conv_weight, x)


def _eca_setup_context(ctx, inputs, output):
    x, conv_weight, gate = inputs
    _, z, pre, s = output
    ctx.save_for_backward(x, conv_weight, z, pre, s)
    ctx.gate = gate


def _eca_backward(ctx, dy, *unused):
    x, conv_weight, z, pre, s = ctx.saved_tensors
    dx, dw = eca_bwd(dy, x, conv_weight, z, pre, s, ctx.gate)
    need = ctx.needs_input_grad
    return dx if need[0] else None, dw if need[1] else None, None


eca_fwd.register_autograd(_eca_backward, setup_context=_eca_setup_context)


def efficient_channel_attention(x: Tensor, conv_weight: Tensor, gate: str) -> Tensor:
    path = route(ECA_OP, x.device, x.dtype, unsupported=sample_too_large(x), tensors=(x, conv_weight))
    if path.path != "triton" or x.numel() == 0:  # nothing to compute (an empty batch or map)
        return reference.efficient_channel_attention(x, conv_weight, gate=gate)
    return eca_fwd(x, conv_weight, gate)[0]


# The SE layers whose excitation holds a norm layer (timm SEModule's norm_layer) run the pooling and
# the scaling as two ops of their own around the PyTorch MLP: forward reads x twice (as the fused
# path), backward adds one pass (the pooling's gradient is its own pass, then autograd sums it in).

@torch.library.custom_op("attn_fast::channel_pool", mutates_args=())
def channel_pool_op(x: Tensor, pool: str) -> Tuple[Tensor, Tensor]:
    """(z, zmax): x pooled over H, W per sample and channel ((N, C) fp32; see kernels.channel_pool)."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.squeeze_excite import channel_pool

        return channel_pool(x, pool)


@channel_pool_op.register_fake
def _(x, pool):
    n, c = x.shape[:2]
    return x.new_empty((n, c), dtype=torch.float32), \
        x.new_empty((n, c) if pool == "avgmax" else (0,), dtype=torch.float32)


@torch.library.custom_op("attn_fast::channel_pool_bwd", mutates_args=())
def channel_pool_bwd(dz: Tensor, x: Tensor, zmax: Tensor, pool: str) -> Tensor:
    """dx of channel_pool: dz / HW everywhere (halved with "avgmax", plus half of dz shared among
    the positions holding the channel max, as torch's amax backward shares it)."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.squeeze_excite import se_grad_input, se_reduce_grad

        hw = x.shape[2] * x.shape[3]
        dz = dz.float()
        if pool == "avgmax":
            _, cnt = se_reduce_grad(x, x, zmax)  # only the tie counts are used
            dz_avg, dz_max = 0.5 * dz / hw, 0.5 * dz / cnt
        else:
            dz_avg, dz_max = dz / hw, dz.new_empty((0,))
        return se_grad_input(None, x, dz_avg, dz_avg.contiguous(), dz_max.contiguous(), zmax)


@channel_pool_bwd.register_fake
def _(dz, x, zmax, pool):
    return empty_like_output(x)


def _pool_setup_context(ctx, inputs, output):
    x, pool = inputs
    ctx.save_for_backward(x, output[1])
    ctx.pool = pool


def _pool_backward(ctx, dz, _dzmax):
    x, zmax = ctx.saved_tensors
    return channel_pool_bwd(dz, x, zmax, ctx.pool), None


channel_pool_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)


@torch.library.custom_op("attn_fast::channel_scale", mutates_args=())
def channel_scale_op(x: Tensor, s: Tensor) -> Tensor:
    """y = x * s[:, :, None, None], s (N, C) fp32, in x's memory format."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.squeeze_excite import channel_scale

        return channel_scale(x, s)


@channel_scale_op.register_fake
def _(x, s):
    return empty_like_output(x)


@torch.library.custom_op("attn_fast::channel_scale_bwd", mutates_args=())
def channel_scale_bwd(dy: Tensor, x: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
    """(dx, ds) of channel_scale: dx = dy * s, ds = sum_hw dy * x (fp32)."""
    from ..kernels.interpreter import kernel_section

    with kernel_section():  # one launch at a time under the interpreter (it is not thread-safe)
        from ..kernels.squeeze_excite import se_grad_input, se_reduce_grad

        empty = x.new_empty((0,), dtype=torch.float32)
        s = s.contiguous()
        ds, _ = se_reduce_grad(dy, x, empty)
        dx = se_grad_input(dy, x, s, torch.zeros_like(s), empty, empty.clone())
        return dx, ds


@channel_scale_bwd.register_fake
def _(dy, x, s):
    return empty_like_output(x), x.new_empty(x.shape[:2], dtype=torch.float32)  # ds: (N, C) fp32, fresh


def _scale_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _scale_backward(ctx, dy):
    x, s = ctx.saved_tensors
    dx, ds = channel_scale_bwd(dy, x, s)
    need = ctx.needs_input_grad
    return dx if need[0] else None, ds if need[1] else None


channel_scale_op.register_autograd(_scale_backward, setup_context=_scale_setup_context)


def fold_batchnorm(norm, fc1_weight: Tensor, fc1_bias: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
    """fc1 followed by ``norm``, when ``norm`` is a BatchNorm in eval mode (an affine map per
    output), as one fc: (weight, bias) in fp32, differentiable in fc1's and the norm's parameters.
    None for any other norm (or a BatchNorm that uses batch statistics)."""
    if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) or norm.training \
            or norm.running_mean is None or norm.running_var is None:
        return None
    a = torch.rsqrt(norm.running_var.float() + norm.eps)
    if norm.weight is not None:
        a = a * norm.weight.float()
    w = fc1_weight.reshape(fc1_weight.shape[0], -1).float() * a[:, None]
    b = -norm.running_mean.float() * a
    if fc1_bias is not None:
        b = b + fc1_bias.float() * a
    if norm.bias is not None:
        b = b + norm.bias.float()
    return w, b


def _in_fp32(norm: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``norm`` (an nn.Module) run on fp32 copies of its parameters and buffers, the buffers it
    updates (BatchNorm's running statistics and batch count) written back: the MLP of the SE path
    with a norm runs in fp32, as the fused one does, whatever the model's dtype. Gradients reach the
    module's own parameters through the casts. A plain callable is called as it is."""
    if not isinstance(norm, torch.nn.Module):
        return norm

    def run(h: Tensor) -> Tensor:
        state = {k: v.float() for k, v in norm.named_parameters()}
        buffers = {k: v.float() if v.is_floating_point() else v.clone() for k, v in norm.named_buffers()}
        out = torch.func.functional_call(norm, {**state, **buffers}, (h,))
        with torch.no_grad():
            for k, v in norm.named_buffers():
                if buffers[k] is not v:
                    v.copy_(buffers[k])
        return out

    return run


def squeeze_excite(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Optional[Tensor],
                   fc2_bias: Optional[Tensor], activation: str, gate: str, pool: str,
                   norm: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    # the norm's parameters too (a BatchNorm in eval mode is folded into fc1); a lazy chain: read
    # only inside a forward-AD dual level
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if isinstance(norm, torch.nn.Module):
        tensors = itertools.chain(tensors, norm.parameters(), norm.buffers())
    path = route(OP, x.device, x.dtype, unsupported=sample_too_large(x), tensors=tensors)
    if path.path == "cpu":
        return squeeze_excite_cpu.squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate,
                                                 pool, norm)
    if path.path != "triton" or x.numel() == 0:  # nothing to compute (an empty batch or map)
        return reference.squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                        activation=activation, gate=gate, pool=pool, norm=norm)
    if norm is not None and fc2_weight is not None:
        folded = fold_batchnorm(norm, fc1_weight, fc1_bias)
        if folded is None:  # a norm with state or batch statistics: the MLP runs in PyTorch, in fp32
            z, _ = channel_pool_op(x, pool)
            f32 = [None if t is None else t.float() for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
            s = excite(z, *f32, activation=activation, gate=gate, norm=_in_fp32(norm))
            if route(OP, x.device, x.dtype, tensors=(s,)).path != "triton":
                # a tangent reached s from the norm callable alone (forward-mode AD): scale in torch
                return (x * s[:, :, None, None]).to(x.dtype)
            return channel_scale_op(x, s.contiguous())
        fc1_weight, fc1_bias = folded
    return se_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, pool)[0]
