"""Shake-Shake regularisation (Gastaldi 2017, "Shake-Shake regularization") and the paper's CIFAR
ResNets, following the author's code (xgastaldi/shake-shake, Lua Torch: models/shakeshake.lua and
models/shakeshakeblock.lua).

`shake_shake` is the reusable combination of two residual branches: forward
alpha * b1 + (1 - alpha) * b2, backward gradients beta * g to b1 and (1 - beta) * g to b2, with
beta independent of alpha. `shake_coefficients` draws alpha and beta for a mode named as in the
paper, "{forward}_{backward}_{level}": forward "shake" (U(0, 1)) or "even" (0.5), backward
"shake" (a new U(0, 1)), "even" (0.5) or "keep" (beta = alpha), level "image" (one draw per
image) or "batch" (one per batch); "even_even" is the unregularised 0.5 / 0.5. Evaluation always
uses 0.5, the expectation of alpha.

The network (the code's CIFAR-10 model; depth 26 means (26 - 2) / 6 = 4 blocks per stage):
3x3 conv 16 + BN (no ReLU: every branch starts with one), three stages of widths d, 2d, 4d with
strides 1, 2, 2, final ReLU, global average pool, fc with bias. A block adds to its shortcut the
shake-shake combination of two branches ReLU-conv3x3(stride)-BN-ReLU-conv3x3-BN. Where the width
changes (also in the first block of stage 1, 16 -> d), the shortcut is ReLU, then two paths
each a 1x1 average pool with the block's stride and a 1x1 conv to half the width, the second on
the input shifted one pixel right and down (zero-filled) so that it sees the other pixels of a
stride-2 grid, concatenated along channels, BN. Otherwise the shortcut is the identity (of the
block input, not its ReLU). Convs have no bias (the code drops them under cuDNN >= 4).
Parameter counts with 10 classes: 2,923,162 / 11,653,978 / 26,192,922 for 26 2x32d / 2x64d /
2x96d (the paper's Table 1: 2.9M, 11.7M, 26.2M).
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.records import ModelInfo, Preprocessing

FORWARD = ("shake", "even")
BACKWARD = ("shake", "even", "keep")
LEVELS = ("image", "batch")


@jax.custom_vjp
def _combine(branch1, branch2, alpha, beta):
    del beta  # only the backward pass reads it
    return alpha * branch1 + (1 - alpha) * branch2


def _combine_fwd(branch1, branch2, alpha, beta):
    return _combine(branch1, branch2, alpha, beta), (alpha, beta)


def _combine_bwd(residuals, g):
    alpha, beta = residuals
    # alpha and beta are random constants: no gradient flows to them.
    return beta * g, (1 - beta) * g, jnp.zeros_like(alpha), jnp.zeros_like(beta)


_combine.defvjp(_combine_fwd, _combine_bwd)


def shake_shake(branch1, branch2, alpha, beta):
    """alpha * branch1 + (1 - alpha) * branch2 in the forward pass, whose backward pass sends
    beta * g to branch1 and (1 - beta) * g to branch2 (Gastaldi 2017).

    The branches must have the same shape; alpha and beta are scalars or arrays that broadcast
    against them (e.g. [B, 1, 1, 1] for per-image coefficients) and receive no gradient.
    """
    if branch1.shape != branch2.shape:
        raise ValueError(f"shake_shake needs branches of one shape, got {branch1.shape} and "
                         f"{branch2.shape}")
    alpha = jnp.asarray(alpha, branch1.dtype)
    beta = jnp.asarray(beta, branch1.dtype)
    if jnp.broadcast_shapes(branch1.shape, alpha.shape, beta.shape) != branch1.shape:
        raise ValueError(f"alpha {alpha.shape} and beta {beta.shape} must broadcast against "
                         f"the branches {branch1.shape}")
    return _combine(branch1, branch2, alpha, beta)


def parse_mode(mode: str) -> tuple[str, str, str]:
    """"shake_shake_image" -> ("shake", "shake", "image"); "even_even" -> ("even", "even",
    "batch")."""
    parts = tuple(mode.split("_")) if isinstance(mode, str) else ()
    if parts == ("even", "even"):
        return "even", "even", "batch"
    if (len(parts) != 3 or parts[0] not in FORWARD or parts[1] not in BACKWARD
            or parts[2] not in LEVELS or parts[:2] == ("even", "even")):
        raise ValueError(f"unknown shake-shake mode {mode!r}: use 'even_even' or "
                         f"'{{forward}}_{{backward}}_{{level}}' with forward in {FORWARD}, "
                         f"backward in {BACKWARD}, level in {LEVELS} (e.g. 'shake_shake_image')")
    return parts


def shake_coefficients(mode: str, batch: int, is_training: bool, ndim: int = 4):
    """(alpha, beta), each of shape [batch, 1, ...] ("image" level) or [1, 1, ...] ("batch"),
    `ndim` axes in all. Random draws use `hk.next_rng_key()`; evaluation gives 0.5 and 0.5."""
    forward, backward, level = parse_mode(mode)
    shape = ((batch if level == "image" else 1),) + (1,) * (ndim - 1)
    half = jnp.full(shape, 0.5, jnp.float32)
    if not is_training:
        return half, half
    if forward == "shake" or backward == "shake":
        alpha_key, beta_key = jax.random.split(hk.next_rng_key())
    alpha = jax.random.uniform(alpha_key, shape) if forward == "shake" else half
    if backward == "shake":
        beta = jax.random.uniform(beta_key, shape)
    else:
        beta = alpha if backward == "keep" else half
    return alpha, beta


class ShakeShakeBlock(hk.Module):
    """shortcut(x) + shake_shake(branch1(ReLU x), branch2(ReLU x)); see the module docstring."""

    def __init__(self, out_channels: int, stride: int, mode: str, bn_decay: float,
                 bn_eps: float, name: str):
        super().__init__(name=name)
        self.out_channels, self.stride, self.mode = out_channels, stride, mode
        self.bn = functools.partial(layers.BatchNorm, bn_decay, bn_eps)

    @hk.name_like("__call__")
    def _branch(self, h, i, is_training):
        h = layers.Conv(self.out_channels, 3, self.stride, name=f"branch{i}_conv1")(h)
        h = jax.nn.relu(self.bn(name=f"branch{i}_bn1")(h, is_training))
        h = layers.Conv(self.out_channels, 3, name=f"branch{i}_conv2")(h)
        return self.bn(name=f"branch{i}_bn2")(h, is_training)

    @hk.name_like("__call__")
    def _shortcut(self, x, h, is_training):
        if x.shape[-1] == self.out_channels and self.stride == 1:
            return x
        if self.out_channels % 2:
            raise ValueError(f"{self.module_name}: the two-path shortcut needs an even width, "
                             f"got {self.out_channels}")
        half = self.out_channels // 2
        shifted = jnp.pad(h, ((0, 0), (1, 0), (1, 0), (0, 0)))[:, :-1, :-1]
        paths = [layers.Conv(half, 1, name=f"shortcut_conv{i}")(
                     layers.avg_pool(p, 1, self.stride))
                 for i, p in ((1, h), (2, shifted))]
        return self.bn(name="shortcut_bn")(jnp.concatenate(paths, axis=-1), is_training)

    def __call__(self, x, is_training):
        h = jax.nn.relu(x)
        b1, b2 = (self._branch(h, i, is_training) for i in (1, 2))
        alpha, beta = shake_coefficients(self.mode, x.shape[0], is_training, x.ndim)
        return self._shortcut(x, h, is_training) + shake_shake(b1, b2, alpha, beta)


class ShakeShakeResNet(hk.Module):
    """The paper's CIFAR Shake-Shake ResNet "depth 2x{width}d". `__call__` gives logits (pooled
    features when num_classes=0); `features` gives the three stage outputs {"stage1": stride 1,
    "stage2": stride 2, "stage3": stride 4} (before the final ReLU).

    Args:
      depth: 6n + 2 for n blocks per stage (26: 4 blocks).
      width: d, the width of the first stage (then 2d, 4d); the paper's 32, 64 or 96.
      mode: shake-shake mode (see `shake_coefficients`): "shake_shake_image" (the paper's best
        on CIFAR-10), "even_even", ...
      bn_decay, bn_eps: BatchNorm running-average decay and epsilon (Torch's 0.9, 1e-5).
    """

    def __init__(self, depth: int = 26, width: int = 32, num_classes: int = 10,
                 mode: str = "shake_shake_image", in_channels: int = 3, bn_decay: float = 0.9,
                 bn_eps: float = 1e-5, name: str = "shake_shake"):
        super().__init__(name=name)
        if int(depth) != depth or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 26, ...), "
                             f"got {depth!r}")
        if int(width) != width or width < 1 or width % 2:
            raise ValueError(f"width must be a positive even int, got {width!r}")
        parse_mode(mode)
        self.blocks_per_stage, self.width = (depth - 2) // 6, width
        self.num_classes, self.in_channels, self.mode = num_classes, in_channels, mode
        self.bn_decay, self.bn_eps = bn_decay, bn_eps

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        x = layers.Conv(16, 3, name="conv1")(images)
        x = layers.BatchNorm(self.bn_decay, self.bn_eps, name="bn1")(x, is_training)
        maps = {}
        for s, multiple in enumerate((1, 2, 4)):
            for i in range(self.blocks_per_stage):
                stride = 2 if s > 0 and i == 0 else 1
                x = ShakeShakeBlock(self.width * multiple, stride, self.mode, self.bn_decay,
                                    self.bn_eps, name=f"layer{s + 1}_{i}")(x, is_training)
            maps[f"stage{s + 1}"] = x
        return maps

    def __call__(self, images, is_training: bool):
        x = jax.nn.relu(self.features(images, is_training)["stage3"])
        return layers.classifier(x, self.num_classes, is_training, b_init=jnp.zeros)


# ----------------------------------------------------------------------------------------------
# Registered variants: the paper's CIFAR-10 networks (Table 1).

# fb.resnet.torch's CIFAR-10 normalisation, which the author's code uses; no eval crop.
CIFAR10_PREPROCESSING = Preprocessing(mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
                                      std=(63.0 / 255, 62.1 / 255, 66.7 / 255),
                                      crop_fraction=1.0)


def _variant(width: int) -> ModelInfo:
    return ModelInfo(name=f"shake_shake_26_2x{width}d", family="shake_shake",
                     builder=ShakeShakeResNet, config=dict(depth=26, width=width),
                     reference="paper:Shake-Shake (Gastaldi 2017) / xgastaldi/shake-shake",
                     train_size=32, test_size=32, preprocessing=CIFAR10_PREPROCESSING,
                     feature_strides=(1, 2, 4))


VARIANTS = tuple(_variant(width) for width in (32, 64, 96))
