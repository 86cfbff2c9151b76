"""Building blocks shared by the model families. Nothing here knows an architecture.

Conventions: images and feature maps are channels-last (NHWC, or NTHWC for video), kernels HWIO.
Parameters are float32; a layer computes in the dtype of its input (the compute-dtype policy),
except BatchNorm, which always reduces in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# "torch", "same", pixels on every side, or explicit (low, high) pairs, one per spatial dim.
Padding = Literal["torch", "same"] | int | Sequence[tuple[int, int]]
Lowering = Literal["auto", "auto_in_loop", "native", "cpu", "cpu_loop"]

# ----------------------------------------------------------------------------------------------
# Input checks


def check_images(images, model: str, channels: int, spatial_dims: int = 2) -> None:
    """Raises a ValueError naming the expected shape when `images` is not [B, *spatial, C]."""
    layout = "[batch, height, width, channels]" if spatial_dims == 2 else (
        "[batch, time, height, width, channels]")
    expected = f"{model} expects float images of shape {layout} with {channels} channels"
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != spatial_dims + 2:
        raise ValueError(f"{expected}; got an array of rank {len(shape)} with shape {shape}.")
    if shape[-1] != channels:
        hint = ""
        if shape[1] == channels:
            hint = " The channels look like they come first: transpose NCHW to NHWC."
        raise ValueError(f"{expected}; got shape {shape} with {shape[-1]} channels.{hint}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{expected}; got dtype {images.dtype} (normalise the images first).")


# ----------------------------------------------------------------------------------------------
# Convolution


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_padding(padding: Padding, in_size: Sequence[int], kernel: Sequence[int],
                 stride: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
    """Explicit (low, high) padding per spatial dim.

    "torch": symmetric, `dilation * (k - 1) // 2` on each side (PyTorch's usual `padding=k//2`).
    "same": TensorFlow's SAME (output = ceil(in / stride), the odd pixel on the high side).
    int: that many pixels on each side.
    ((low, high), ...): exactly these, one pair per spatial dim (e.g. Keras MobileNet's
    ZeroPadding2D(((0, 1), (0, 1))) before its stride-2 convs).
    """
    if not isinstance(padding, (str, int)):
        pads = [tuple(map(int, p)) for p in padding]
        if len(pads) != len(in_size) or any(len(p) != 2 for p in pads):
            raise ValueError(f"explicit padding needs one (low, high) pair per spatial dim, "
                             f"got {padding!r}")
        return pads
    pads = []
    for n, k, s, d in zip(in_size, kernel, stride, dilation):
        extent = d * (k - 1) + 1
        if padding == "torch":
            pads.append((d * (k - 1) // 2,) * 2)
        elif padding == "same":
            total = max((-(-n // s) - 1) * s + extent - n, 0)
            pads.append((total // 2, total - total // 2))
        elif isinstance(padding, int):
            pads.append((padding, padding))
        else:
            raise ValueError(f"padding must be 'torch', 'same' or an int, got {padding!r}")
    return pads


def default_lowering(in_loop: bool = False) -> str:
    """XLA:CPU runs grouped and depthwise convs far slower than equivalent dense ops
    (../shared/reference/cpu_conv_lowering.md), and conv gradients inside loops slower still;
    on GPU/TPU the native ops are right. NETS_CONV_LOWERING=native|cpu overrides the choice."""
    forced = os.environ.get("NETS_CONV_LOWERING")
    if forced and forced not in ("native", "cpu"):
        raise ValueError(f"NETS_CONV_LOWERING must be 'native' or 'cpu', got {forced!r}")
    choice = forced or ("cpu" if jax.default_backend() == "cpu" else "native")
    return "cpu_loop" if choice == "cpu" and in_loop else choice


def conv(x, w, *, stride=1, padding: Padding = "torch", dilation=1, groups: int = 1,
         lowering: Lowering = "auto"):
    """N-d convolution, channels-last input and HWIO (DHWIO...) kernel of shape
    (*kernel, C_in / groups, C_out). Every lowering computes the same function:
    "native" is XLA's convolution; "cpu" writes 1x1 convs as matmuls, grouped convs as one dense
    conv per group and depthwise convs as shifted multiply-adds; "cpu_loop" is "cpu" with the
    gradients of k x k convs computed as shifted matmuls, for bodies of scans; "auto" and
    "auto_in_loop" pick by backend (`default_lowering`)."""
    nd = w.ndim - 2
    tup = (lambda v: (v,) * nd if isinstance(v, int) else tuple(v))
    stride, dilation, kernel = tup(stride), tup(dilation), w.shape[:nd]
    pads = conv_padding(padding, x.shape[1:1 + nd], kernel, stride, dilation)
    if lowering in ("auto", "auto_in_loop"):
        lowering = default_lowering(in_loop=lowering == "auto_in_loop")
    c_in_per_group, c_out = w.shape[-2], w.shape[-1]
    if lowering == "native":
        return _native_conv(x, w, stride, pads, dilation, groups)
    if lowering not in ("cpu", "cpu_loop"):
        raise ValueError(f"unknown conv lowering {lowering!r}; use one of {Lowering.__args__}")
    if all(k == 1 for k in kernel):
        return _pointwise_conv(x, w, stride, pads, groups)
    if c_in_per_group == 1:
        return _depthwise_shifted(x, w, stride, pads, dilation, c_out // groups)
    if lowering == "cpu_loop" and c_in_per_group >= _MIN_MATMUL_DEPTH:
        return _conv_with_matmul_grads(x, w, tuple(stride), tuple(map(tuple, pads)),
                                       tuple(dilation), groups)
    return _cpu_forward(x, w, stride, pads, dilation, groups)


def _cpu_forward(x, w, stride, pads, dilation, groups):
    if groups == 1:
        return _native_conv(x, w, stride, pads, dilation, 1)
    return _grouped_split(x, w, stride, pads, dilation, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_with_matmul_grads(x, w, stride, pads, dilation, groups):
    """XLA:CPU's forward conv, with gradients computed as the shifted matmuls' gradients.
    Inside a loop (a scan over blocks) XLA:CPU runs its native conv's input gradient 6x and
    weight gradient 35x slower than outside; matmuls keep their speed."""
    return _cpu_forward(x, w, stride, pads, dilation, groups)


def _conv_with_matmul_grads_fwd(x, w, stride, pads, dilation, groups):
    return _cpu_forward(x, w, stride, pads, dilation, groups), (x, w)


def _conv_with_matmul_grads_bwd(stride, pads, dilation, groups, residuals, dy):
    x, w = residuals
    _, vjp = jax.vjp(lambda x, w: _shifted_matmuls(x, w, stride, pads, dilation, groups), x, w)
    return vjp(dy)


_conv_with_matmul_grads.defvjp(_conv_with_matmul_grads_fwd, _conv_with_matmul_grads_bwd)


# Below this many input channels per group a tap's matmul is too thin to pay off (e.g. RGB stems).
_MIN_MATMUL_DEPTH = 16


def _native_conv(x, w, stride, pads, dilation, groups):
    nd = w.ndim - 2
    spatial = "DHW"[-nd:]
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    return lax.conv_general_dilated(x, w, stride, pads, rhs_dilation=dilation,
                                    dimension_numbers=dn, feature_group_count=groups)


def _pointwise_conv(x, w, stride, pads, groups):
    """A 1x1 conv is a matmul; XLA:CPU runs it up to 2.8x faster written as one."""
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    if any(s != 1 for s in stride):
        x = x[(slice(None), *(slice(None, None, s) for s in stride))]
    w = w.reshape(w.shape[-2:])
    c_in, c_out = x.shape[-1], w.shape[-1]
    # Pixels as the rows of one 2-d matmul: contracting over N, H and W for the weight gradient
    # instead, XLA:CPU transposes each conv's output gradient (a ResNet-50 step: 36 transposes,
    # 17% of its time; BENCHMARKS.md).
    rows = x.reshape(-1, c_in)
    if groups == 1:
        return (rows @ w).reshape(*x.shape[:-1], c_out)
    xg = rows.reshape(-1, groups, c_in // groups)
    wg = w.reshape(c_in // groups, groups, c_out // groups).transpose(1, 0, 2)
    return jnp.einsum("mgc,gco->mgo", xg, wg).reshape(*x.shape[:-1], c_out)


def _grouped_split(x, w, stride, pads, dilation, groups):
    xs = jnp.split(x, groups, axis=-1)
    ws = jnp.split(w, groups, axis=-1)
    return jnp.concatenate(
        [_native_conv(xi, wi, stride, pads, dilation, 1) for xi, wi in zip(xs, ws)], axis=-1)


def _taps(x, kernel, stride, pads, dilation, fill=0.0):
    """Yields (kernel offset, the input window that offset multiplies) over the input padded
    with `fill`."""
    nd = len(kernel)
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], constant_values=fill)
    out_size = [(x.shape[1 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                for i in range(nd)]
    for offset in np.ndindex(*kernel):
        start = [0] + [o * d for o, d in zip(offset, dilation)] + [0]
        limit = ([x.shape[0]] + [s + (n - 1) * st + 1
                                 for s, n, st in zip(start[1:-1], out_size, stride)]
                 + [x.shape[-1]])
        yield offset, lax.slice(x, start, limit, (1, *stride, 1))


def _shifted_matmuls(x, w, stride, pads, dilation, groups):
    """A k x k conv as the sum over kernel taps of (shifted input) @ (tap's kernel). Grouped
    convs put the groups first once, so that every tap is one batched matmul."""
    kernel = w.shape[:-2]
    n, c_in, c_out = x.shape[0], x.shape[-1], w.shape[-1]
    if groups > 1:  # (N, *S, G*C) -> (G*N, *S, C)
        x = jnp.moveaxis(x.reshape(*x.shape[:-1], groups, c_in // groups), -2, 0)
        x = x.reshape(groups * n, *x.shape[2:])
        w = w.reshape(*kernel, c_in // groups, groups, c_out // groups)
    y = None
    for offset, window in _taps(x, kernel, stride, pads, dilation):
        if groups == 1:
            out = jnp.einsum("...c,co->...o", window, w[offset])
        else:
            rows = window.reshape(groups, -1, c_in // groups)
            out = jnp.einsum("gmc,cgo->gmo", rows, w[offset])
        y = out if y is None else y + out
    if groups == 1:
        return y
    out_spatial = window.shape[1:-1]
    y = y.reshape(groups, n, *out_spatial, c_out // groups)
    return jnp.moveaxis(y, 0, -2).reshape(n, *out_spatial, c_out)


def _depthwise_shifted(x, w, stride, pads, dilation, multiplier):
    """Depthwise conv as kh*kw shifted multiply-adds (10-60x faster than XLA:CPU's native)."""
    if multiplier > 1:  # output channel o reads input channel o // multiplier
        x = jnp.repeat(x, multiplier, axis=-1)
    y = None
    for offset, window in _taps(x, w.shape[:-2], stride, pads, dilation):
        tap = window * w[offset + (0,)]
        y = tap if y is None else y + tap
    return y


class Conv(hk.Module):
    """Convolution with native groups and dilation; 2-d by default, `ndim=3` for video.

    Parameters: `w` of shape (*kernel, C_in / groups, C_out) and, with `with_bias`, `b` (C_out,).
    The lowering (see `conv`) is chosen per backend; parameters and outputs do not depend on it.
    """

    def __init__(self, out_channels: int, kernel_size: int | Sequence[int], stride=1,
                 padding: Padding = "torch", dilation=1, groups: int = 1,
                 with_bias: bool = False, ndim: int = 2, w_init=None, b_init=None,
                 lowering: Lowering = "auto", name: str | None = None):
        super().__init__(name=name)
        self.out_channels = out_channels
        self.kernel = (kernel_size,) * ndim if isinstance(kernel_size, int) else tuple(
            kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.with_bias, self.lowering = groups, with_bias, lowering
        # He-normal over fan-out: the init of torchvision's and timm's CNNs.
        self.w_init = w_init or hk.initializers.VarianceScaling(2.0, "fan_out", "normal")
        self.b_init = b_init or jnp.zeros

    def __call__(self, x):
        c_in = x.shape[-1]
        if c_in % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{self.module_name}: channels in {c_in} and out "
                             f"{self.out_channels} must both divide by groups={self.groups}")
        w = hk.get_parameter("w", (*self.kernel, c_in // self.groups, self.out_channels),
                             jnp.float32, init=self.w_init)
        y = conv(x, w.astype(x.dtype), stride=self.stride, padding=self.padding,
                 dilation=self.dilation, groups=self.groups, lowering=self.lowering)
        if self.with_bias or gains_folded_bias(self.module_name):
            y = y + hk.get_parameter("b", (self.out_channels,), jnp.float32,
                                     init=self.b_init).astype(y.dtype)
        return y


class WSConv(hk.Module):
    """Convolution with scaled weight standardisation (Brock et al. 2021, the NFNet code).

    Per output channel o, over the kernel's (*kernel, C_in / groups) entries (N of them):
    W_hat = (W - mean_o) * gain_o / sqrt(max(N * var_o, eps)), var the population variance.
    Parameters `w` (init N(0, 1/fan_in)), `gain` (1) and `bias` (0), shapes as in `Conv`.
    `eps_mode="add"` uses sqrt(N * (var_o + eps)) instead: timm's ScaledStdConv2d.
    """

    def __init__(self, out_channels: int, kernel_size: int | Sequence[int], stride=1,
                 padding: Padding = "same", groups: int = 1, eps: float = 1e-4,
                 eps_mode: str = "floor", lowering: Lowering = "auto", name: str | None = None):
        super().__init__(name=name)
        if eps_mode not in ("floor", "add"):
            raise ValueError(f"eps_mode must be 'floor' or 'add', got {eps_mode!r}")
        self.out_channels, self.kernel = out_channels, _pair(kernel_size)
        self.stride, self.padding, self.groups = stride, padding, groups
        self.eps, self.eps_mode, self.lowering = eps, eps_mode, lowering

    def standardized_weight(self, c_in: int):
        shape = (*self.kernel, c_in // self.groups, self.out_channels)
        w = hk.get_parameter("w", shape, jnp.float32,
                             init=hk.initializers.VarianceScaling(1.0, "fan_in", "normal"))
        gain = hk.get_parameter("gain", (self.out_channels,), jnp.float32, init=jnp.ones)
        fan_in = math.prod(shape[:-1])
        mean = jnp.mean(w, axis=(0, 1, 2))
        var = jnp.var(w, axis=(0, 1, 2))
        if self.eps_mode == "floor":
            scale = gain * lax.rsqrt(jnp.maximum(fan_in * var, self.eps))
        else:
            scale = gain * lax.rsqrt(fan_in * (var + self.eps))
        return w * scale - mean * scale

    def __call__(self, x):
        c_in = x.shape[-1]
        if c_in % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{self.module_name}: channels in {c_in} and out "
                             f"{self.out_channels} must both divide by groups={self.groups}")
        w = self.standardized_weight(c_in).astype(x.dtype)
        bias = hk.get_parameter("bias", (self.out_channels,), jnp.float32, init=jnp.zeros)
        y = conv(x, w, stride=self.stride, padding=self.padding, groups=self.groups,
                 lowering=self.lowering)
        return y + bias.astype(y.dtype)


def depthwise_fan_out_init(scale: float, distribution: str = "truncated_normal"):
    """VarianceScaling over fan-out for a depthwise kernel as TF and Keras count it: they store
    it as (kh, kw, C, 1), so its fan-out is kh * kw; ours is (kh, kw, 1, C)."""
    base = hk.initializers.VarianceScaling(scale, "fan_out", distribution)

    def init(shape, dtype):
        return base((*shape[:-2], shape[-1], 1), dtype).reshape(shape)

    return init


def torch_linear_init(fan_in: int):
    """PyTorch's default nn.Linear/nn.Conv init for weights and biases: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return hk.initializers.RandomUniform(-bound, bound)


class ConvBN(hk.Module):
    """Conv (no bias), BatchNorm and an optional activation under one name, with submodules
    `conv` and `bn` (timm's ConvNormAct). `zero_init` starts the BN scale at zero (the last BN
    of a residual branch)."""

    def __init__(self, out_channels: int, kernel_size: int | Sequence[int], stride=1,
                 dilation=1, groups: int = 1, activation: str | None = "relu",
                 zero_init: bool = False, bn_decay: float = 0.9, bn_eps: float = 1e-5,
                 name: str | None = None):
        super().__init__(name=name)
        self.out_channels, self.kernel_size, self.stride = out_channels, kernel_size, stride
        self.dilation, self.groups, self.activation = dilation, groups, activation
        self.zero_init, self.bn_decay, self.bn_eps = zero_init, bn_decay, bn_eps

    def __call__(self, x, is_training: bool):
        x = Conv(self.out_channels, self.kernel_size, self.stride, dilation=self.dilation,
                 groups=self.groups, name="conv")(x)
        x = BatchNorm(self.bn_decay, self.bn_eps, zero_init=self.zero_init, name="bn")(
            x, is_training)
        return activation(self.activation)(x) if self.activation else x


class Linear(hk.Module):
    """Dense layer with float32 parameters `w` (C_in, C_out) and `b`, computing in the input's
    dtype. Default init is PyTorch's nn.Linear (the classifier init of torchvision and timm)."""

    def __init__(self, out_features: int, with_bias: bool = True, w_init=None, b_init=None,
                 name: str | None = None):
        super().__init__(name=name)
        self.out_features, self.with_bias = out_features, with_bias
        self.w_init, self.b_init = w_init, b_init

    def __call__(self, x):
        fan_in = x.shape[-1]
        w = hk.get_parameter("w", (fan_in, self.out_features), jnp.float32,
                             init=self.w_init or torch_linear_init(fan_in))
        y = x @ w.astype(x.dtype)
        if self.with_bias:
            b = hk.get_parameter("b", (self.out_features,), jnp.float32,
                                 init=self.b_init or torch_linear_init(fan_in))
            y = y + b.astype(x.dtype)
        return y


def classifier(x, num_classes: int, is_training: bool, *, dropout_rate: float = 0.0,
               name: str = "fc", **linear_kwargs):
    """A CNN's head: the mean over the spatial axes, in float32 so that logits are float32 under
    any compute dtype; then, unless num_classes is 0 (pooled features), dropout while training
    and the `Linear` layer `name` (called inside the model, it is the model's submodule)."""
    x = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1)))
    if not num_classes:
        return x
    if is_training and dropout_rate:
        x = hk.dropout(hk.next_rng_key(), dropout_rate, x)
    return Linear(num_classes, name=name, **linear_kwargs)(x)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["logits", "auxiliary"],
                   meta_fields=["weights"])
@dataclasses.dataclass(frozen=True)
class AuxiliaryOutputs:
    """A classifier's training-mode output when it has auxiliary heads (GoogLeNet's two,
    Inception-v3's one): the main `logits`, each auxiliary head's logits and, static, the weight
    of each auxiliary head's loss in the training objective (the classification task adds
    weight * loss(auxiliary) to loss(logits)). In eval mode such a model returns plain logits."""

    logits: jax.Array
    auxiliary: tuple[jax.Array, ...]
    weights: tuple[float, ...]


# ----------------------------------------------------------------------------------------------
# Normalisation


class Fusion(NamedTuple):
    """Which BatchNorms are folded into the conv before them (`nets.fusion`): those convs gain a
    bias `b` and those BatchNorms vanish; every other BatchNorm becomes the per-channel affine
    x * scale + offset of its eval-mode function (no running statistics)."""

    convs: frozenset[str]          # Haiku module names of the convs that gain a bias
    norms: frozenset[str]          # ... of the BatchNorms folded into them


_FUSION: contextvars.ContextVar[Fusion | None] = contextvars.ContextVar("fusion", default=None)


@contextlib.contextmanager
def fused(fusion: Fusion | None):
    """Builds the modules called inside in fused form (inference only); None: unchanged."""
    token = _FUSION.set(fusion)
    try:
        yield
    finally:
        _FUSION.reset(token)


_BATCH_NORM_EVAL: contextvars.ContextVar[bool] = contextvars.ContextVar("batch_norm_eval",
                                                                     default=False)


@contextlib.contextmanager
def batch_norm_eval(enabled: bool = True):
    """BatchNorms built inside normalise with their running statistics, and leave them as they
    are, even with is_training=True (mmdetection's `norm_eval`: fine-tuning on batches too
    small for their own statistics); dropout and stochastic depth still train."""
    token = _BATCH_NORM_EVAL.set(enabled)
    try:
        yield
    finally:
        _BATCH_NORM_EVAL.reset(token)


def gains_folded_bias(conv_module_name: str) -> bool:
    fusion = _FUSION.get()
    return fusion is not None and conv_module_name in fusion.convs


def _fused_batch_norm(module_name: str, x, is_training: bool):
    fusion = _FUSION.get()
    if is_training:
        raise ValueError(f"{module_name}: a model with its BatchNorms fused (nets.fusion) is "
                         "for inference only; call it with is_training=False.")
    if module_name in fusion.norms:
        return x
    c = x.shape[-1]
    scale = hk.get_parameter("scale", (c,), jnp.float32, init=jnp.ones)
    offset = hk.get_parameter("offset", (c,), jnp.float32, init=jnp.zeros)
    return (x.astype(jnp.float32) * scale + offset).astype(x.dtype)


class BatchNorm(hk.Module):
    """BatchNorm whose state is exactly the running mean and variance (no counters).

    `decay` is the running-average decay: running = decay * running + (1 - decay) * batch.
    PyTorch's momentum m is decay = 1 - m (torch: 0.9, eps 1e-5, unbiased running variance);
    Keras' momentum is the decay itself (0.99, eps 1e-3, biased running variance).
    Statistics are reduced in float32 over every axis but the last; under `jax.jit` with the
    batch sharded across devices they are the global batch's (synchronised BatchNorm).
    `create_scale=False` has no `scale` (a fixed 1, as Keras' `scale=False`: the next layer is
    linear and can absorb it).
    """

    def __init__(self, decay: float = 0.9, eps: float = 1e-5, unbiased_running_var: bool = True,
                 zero_init: bool = False, create_scale: bool = True, name: str | None = None):
        super().__init__(name=name)
        self.decay, self.eps = decay, eps
        self.unbiased_running_var = unbiased_running_var
        self.zero_init, self.create_scale = zero_init, create_scale

    def __call__(self, x, is_training: bool):
        if _FUSION.get() is not None:
            return _fused_batch_norm(self.module_name, x, is_training)
        c = x.shape[-1]
        scale = jnp.ones((c,), jnp.float32)
        if self.create_scale:
            scale = hk.get_parameter("scale", (c,), jnp.float32,
                                     init=jnp.zeros if self.zero_init else jnp.ones)
        offset = hk.get_parameter("offset", (c,), jnp.float32, init=jnp.zeros)
        running_mean = hk.get_state("mean", (c,), jnp.float32, init=jnp.zeros)
        running_var = hk.get_state("var", (c,), jnp.float32, init=jnp.ones)
        xf = x.astype(jnp.float32)
        if is_training and not _BATCH_NORM_EVAL.get():
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            if not hk.running_init():
                n = math.prod(x.shape[:-1])
                update_var = var * (n / max(n - 1, 1)) if self.unbiased_running_var else var
                d = self.decay
                hk.set_state("mean", d * running_mean + (1 - d) * mean)
                hk.set_state("var", d * running_var + (1 - d) * update_var)
        else:
            mean, var = running_mean, running_var
        inv = scale * lax.rsqrt(var + self.eps)
        return (xf * inv + (offset - mean * inv)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention, regularisation, activations, pooling


class SqueezeExcite(hk.Module):
    """Squeeze-and-excitation: x * gate(fc2(act(fc1(mean over space of x)))).

    Parameters `fc1` (C -> reduced_channels) and `fc2` (reduced -> C) are dense layers, with
    biases unless `with_bias=False` (the SE paper's FCs have biases; some ports drop them).
    """

    def __init__(self, reduced_channels: int, with_bias: bool = True,
                 activation: Callable = jax.nn.relu, gate: Callable = jax.nn.sigmoid,
                 w_init=None, b_init=None, names: tuple[str, str] = ("fc1", "fc2"),
                 name: str | None = None):
        super().__init__(name=name)
        self.reduced_channels, self.with_bias = reduced_channels, with_bias
        self.activation, self.gate = activation, gate
        self.w_init, self.b_init, self.names = w_init, b_init, names

    def __call__(self, x):
        c = x.shape[-1]
        s = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        s = Linear(self.reduced_channels, self.with_bias, self.w_init, self.b_init,
                   name=self.names[0])(s)
        s = Linear(c, self.with_bias, self.w_init, self.b_init,
                   name=self.names[1])(self.activation(s))
        return x * self.gate(s).reshape(s.shape[0], *(1,) * (x.ndim - 2), c)


def stochastic_depth(x, rate, is_training: bool, scale_at: str = "train"):
    """Drops the residual branch `x` per sample with probability `rate`.

    scale_at="train" (the default, as timm and torchvision): kept samples are scaled by
    1 / (1 - rate) while training and the branch is untouched at test time, so the eval network
    is the plain network. scale_at="test": the original paper (Huang et al. 2016) trains with an
    unscaled 0/1 mask and multiplies the branch by its survival probability at test time, i.e.
    ReLU(p * f(x) + x). scale_at="none": an unscaled mask in training and the plain branch at
    test time (the official NFNet code, "sans rescaling"). `rate` may be a traced array.
    """
    if scale_at not in ("train", "test", "none"):
        raise ValueError(f"scale_at must be 'train', 'test' or 'none', got {scale_at!r}")
    if isinstance(rate, (int, float)) and rate == 0:
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    if not is_training:
        return x * keep.astype(x.dtype) if scale_at == "test" else x
    mask = jax.random.bernoulli(hk.next_rng_key(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    mask = mask.astype(x.dtype)
    return x * (mask / keep.astype(x.dtype)) if scale_at == "train" else x * mask


ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "hard_swish": jax.nn.hard_swish,  # x * relu6(x + 3) / 6, as PyTorch's Hardswish
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "sigmoid": jax.nn.sigmoid,
}


def activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def max_pool(x, window: int, stride: int, padding: Padding = 0,
             lowering: Literal["auto", "native", "cpu"] = "auto"):
    """Max pooling over the spatial axes with PyTorch (int) or TF ("same") padding.

    "native" is XLA's reduce_window, whose gradient is a select-and-scatter; "cpu" computes
    the same values and gradients (each window's gradient to its first maximum, as
    select-and-scatter) from shifted slices, which XLA:CPU runs several times faster in the
    backward pass; "auto" picks by backend (`default_lowering`)."""
    nd = x.ndim - 2
    window, stride = (window,) * nd, (stride,) * nd
    pads = conv_padding(padding, x.shape[1:-1], window, stride, (1,) * nd)
    if lowering == "auto":
        lowering = "native" if default_lowering() == "native" else "cpu"
    if lowering == "native":
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *stride, 1),
                                 [(0, 0), *pads, (0, 0)])
    if lowering != "cpu":
        raise ValueError(f"unknown max-pool lowering {lowering!r}; use 'auto', 'native' or 'cpu'")
    return _shifted_max_pool(x, window, stride, tuple(map(tuple, pads)))


def _pool_windows(x, window, stride, pads):
    return [w for _, w in _taps(x, window, stride, pads, (1,) * len(window), fill=-jnp.inf)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _shifted_max_pool(x, window, stride, pads):
    return functools.reduce(jnp.maximum, _pool_windows(x, window, stride, pads))


def _shifted_max_pool_fwd(x, window, stride, pads):
    y = _shifted_max_pool(x, window, stride, pads)
    return y, (x, y)


def _shifted_max_pool_bwd(window, stride, pads, residuals, dy):
    """Routes each output's gradient to the first window position (in row-major order) that
    holds the maximum, as XLA's select-and-scatter with `>=` does: ties after a ReLU are common."""
    x, y = residuals
    windows, scatter = jax.vjp(lambda x: _pool_windows(x, window, stride, pads), x)
    taken = jnp.zeros(y.shape, bool)
    routed = []
    for w in windows:
        first = (w == y) & ~taken
        taken = taken | first
        routed.append(jnp.where(first, dy, jnp.zeros_like(dy)))
    return scatter(routed)


_shifted_max_pool.defvjp(_shifted_max_pool_fwd, _shifted_max_pool_bwd)


def avg_pool(x, window: int, stride: int, padding: int = 0, ceil_mode: bool = False,
             count_include_pad: bool = True):
    """Average pooling with PyTorch's semantics (nn.AvgPool2d), including `ceil_mode`."""
    nd = x.ndim - 2
    pads = []
    for n in x.shape[1:-1]:
        span = n + 2 * padding - window
        out = (-(-span // stride) if ceil_mode else span // stride) + 1
        if ceil_mode and (out - 1) * stride >= n + padding:
            out -= 1  # PyTorch: the last window must start inside the input or left padding
        pads.append((padding, padding + max((out - 1) * stride + window - n - 2 * padding, 0)))
    dims, strides = (1, *(window,) * nd, 1), (1, *(stride,) * nd, 1)
    total = lax.reduce_window(x, 0.0, lax.add, dims, strides, [(0, 0), *pads, (0, 0)])
    ones = jnp.ones((1, *x.shape[1:-1], 1), x.dtype)
    if count_include_pad:  # zeros of the symmetric padding count, the ceil overhang does not
        ones = jnp.pad(ones, [(0, 0), *[(padding, padding)] * nd, (0, 0)], constant_values=1)
        count_pads = [(0, 0), *[(0, hi - padding) for _, hi in pads], (0, 0)]
    else:
        count_pads = [(0, 0), *pads, (0, 0)]
    count = lax.reduce_window(ones, 0.0, lax.add, dims, strides, count_pads)
    return total / count


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """Rounds a channel count to a multiple of `divisor`, never dropping below `round_limit`
    of the value (the rule of the MobileNet/EfficientNet/timm code)."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def channel_shuffle(x, groups: int):
    """ShuffleNet's channel shuffle: channel g * (C / groups) + i moves to i * groups + g, so that
    the next grouped conv sees channels from every group (NCHW view(g, C/g).transpose, in NHWC)."""
    c = x.shape[-1]
    if c % groups:
        raise ValueError(f"channel_shuffle: {c} channels do not divide into {groups} groups")
    x = x.reshape(*x.shape[:-1], groups, c // groups)
    return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], c)
