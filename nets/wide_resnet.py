"""Wide Residual Networks for CIFAR (Zagoruyko & Komodakis 2016, "Wide Residual Networks"),
WRN-n-k as the authors' code builds them (szagoruyko/wide-residual-networks: the Lua
models/wide-resnet.lua and its PyTorch port pytorch/resnet.py, which agree).

Depth n = 6N + 4: a 3x3 conv to 16 channels, three groups of N pre-activation basic blocks of
widths 16k, 32k, 64k (strides 1, 2, 2), then BN-ReLU, global average pool and fc (with bias).
A block is BN-ReLU - 3x3 conv (the block's stride) - BN-ReLU - [dropout] - 3x3 conv, added to
its shortcut: the input itself, or, where the width changes (the first block of each group,
16 -> 16k included), a 1x1 conv with the block's stride reading the *pre-activated* input (the
first BN-ReLU's output, shared with the residual branch, as in both versions of the code).
Convs have no bias (the code's `DisableBias`). Dropout ("WRN-n-k-dropout", the paper's 0.3)
sits between the two convs and acts only in training.

Parameter counts with 10 classes: WRN-28-10 36,479,194, WRN-40-4 8,949,210, WRN-16-8
10,961,370, WRN-16-4 2,748,890 (the paper's Table 4 and 5: 36.5M, 8.9M, 11.0M, 2.7M).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.records import CIFAR10_PREPROCESSING, ModelInfo

# The Lua code's MSRinit: N(0, 2 / (k * k * out_channels)), He-normal over fan-out, untruncated.
CONV_INIT = hk.initializers.VarianceScaling(2.0, "fan_out", "normal")


class WideBasicBlock(hk.Module):
    """shortcut + conv1(dropout(ReLU(BN(conv0(ReLU(BN(x))))))); see the module docstring.
    Module names follow pytorch/resnet.py's parameters (bn0, conv0, bn1, conv1, convdim)."""

    def __init__(self, out_channels: int, stride: int, dropout_rate: float, bn_decay: float,
                 bn_eps: float, name: str):
        super().__init__(name=name)
        self.out_channels, self.stride, self.dropout_rate = out_channels, stride, dropout_rate
        self.bn = functools.partial(layers.BatchNorm, bn_decay, bn_eps)

    def __call__(self, x, is_training: bool):
        conv = functools.partial(layers.Conv, self.out_channels, w_init=CONV_INIT)
        o1 = jax.nn.relu(self.bn(name="bn0")(x, is_training))
        y = conv(3, self.stride, name="conv0")(o1)
        o2 = jax.nn.relu(self.bn(name="bn1")(y, is_training))
        if is_training and self.dropout_rate > 0:
            o2 = hk.dropout(hk.next_rng_key(), self.dropout_rate, o2)
        z = conv(3, name="conv1")(o2)
        if x.shape[-1] == self.out_channels and self.stride == 1:
            return z + x
        return z + conv(1, self.stride, name="convdim")(o1)


class WideResNet(hk.Module):
    """WRN-depth-widen_factor for 32 px images. `__call__` gives logits (pooled features when
    num_classes=0); `features` gives the three group outputs {"stage1": stride 1, "stage2":
    stride 2, "stage3": stride 4}, the last after the final BN-ReLU (what the head pools).

    Args:
      depth: n = 6N + 4 for N blocks per group (28: 4 blocks).
      widen_factor: k; group widths 16k, 32k, 64k.
      dropout_rate: dropout between each block's two convs while training (the paper's 0.3
        for "WRN-n-k-dropout"; the code's in-place nn.Dropout scales kept units by
        1 / (1 - rate), as hk.dropout does).
      bn_decay, bn_eps: BatchNorm running-average decay and epsilon (Torch's 0.9, 1e-5).

    Initialisation as the Lua code: convs He-normal over fan-out, BN scale 1 and offset 0, the
    fc weight Torch's nn.Linear default U(+-1/sqrt(fan_in)) and its bias 0.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, dropout_rate: float = 0.0,
                 num_classes: int = 10, in_channels: int = 3, bn_decay: float = 0.9,
                 bn_eps: float = 1e-5, name: str = "wide_resnet"):
        super().__init__(name=name)
        if int(depth) != depth or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6N + 4 with N >= 1 (10, 16, 22, 28, 40, ...), "
                             f"got {depth!r}")
        if int(widen_factor) != widen_factor or widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor!r}")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
        self.blocks_per_group, self.widen_factor = (depth - 4) // 6, int(widen_factor)
        self.dropout_rate, self.num_classes = dropout_rate, num_classes
        self.in_channels = in_channels
        self.bn_decay, self.bn_eps = bn_decay, bn_eps

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        x = layers.Conv(16, 3, w_init=CONV_INIT, name="conv0")(images)
        maps = {}
        for g, width in enumerate((16, 32, 64)):
            for i in range(self.blocks_per_group):
                stride = 2 if g > 0 and i == 0 else 1
                x = WideBasicBlock(width * self.widen_factor, stride, self.dropout_rate,
                                   self.bn_decay, self.bn_eps, name=f"group{g}_block{i}")(
                                       x, is_training)
            if g < 2:
                maps[f"stage{g + 1}"] = x
        bn = layers.BatchNorm(self.bn_decay, self.bn_eps, name="bn")
        maps["stage3"] = jax.nn.relu(bn(x, is_training))  # what the head pools
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)["stage3"]
        return layers.classifier(x, self.num_classes, is_training, b_init=jnp.zeros)


def torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path -> the official PyTorch code's parameter prefix (pytorch/resnet.py:
    "group0_block0.conv0" -> "group0.block0.conv0"; "conv0", "bn", "fc" unchanged), as the
    PyTorch module tree restating that code names it. (The code's own flat dict names a conv
    weight by its prefix alone, "group0.block0.conv0", where a module has ".weight".)"""
    del config
    return path.replace("_block", ".block")


# ----------------------------------------------------------------------------------------------
# Registered variants: the paper's CIFAR networks (Tables 4 and 5), 10 classes by default
# (CIFAR-10; num_classes=100 gives the CIFAR-100 nets).


def _variant(depth: int, widen_factor: int) -> ModelInfo:
    return ModelInfo(name=f"wrn_{depth}_{widen_factor}", family="wide_resnet",
                     builder=WideResNet, config=dict(depth=depth, widen_factor=widen_factor),
                     reference="paper:WRN (Zagoruyko & Komodakis 2016) / "
                               "szagoruyko/wide-residual-networks",
                     train_size=32, test_size=32, preprocessing=CIFAR10_PREPROCESSING,
                     feature_strides=(1, 2, 4), task_metadata=dict(num_classes=10),
                     torch_name=torch_name)


VARIANTS = tuple(_variant(d, k) for d, k in ((16, 4), (16, 8), (28, 10), (40, 4)))
