"""Xception (Chollet 2017, "Xception: Deep Learning with Depthwise Separable Convolutions"),
exact to keras.applications' `Xception`.

Entry flow: two unpadded 3x3 convs (32 strided, 64), then three blocks of two separable convs
(128, 256, 728) ending in a strided 3x3 max pool, each added to a strided 1x1 conv + BN of its
input. Middle flow: eight residual blocks of three ReLU-separable conv-BN at 728 channels. Exit
flow: a block like the entry ones (728, 1024), then separable convs to 1536 and 2048 with ReLU.
A separable conv is a 3x3 depthwise conv then a 1x1 pointwise conv, neither with a bias; BN is
Keras' (momentum 0.99, eps 1e-3, biased running variance). Inputs are scaled to [-1, 1].
Initialisation is the zoo's (`layers.Conv`'s He-normal), not Keras' glorot-uniform.

Module names are Keras' layer names ("block4_sepconv2", "block4_sepconv2_bn"); the separable
convs hold `depthwise` and `pointwise` convs. Keras leaves the shortcut convs and their BNs
unnamed ("conv2d", "batch_normalization_1", ...); here they are `block{i}_shortcut` and
`block{i}_shortcut_bn`, and `keras_name` gives Keras' fresh-session names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax

from nets import layers
from nets.records import UNIT_RANGE_PREPROCESSING, ModelInfo

# (block, width of its two separable convs, whether a ReLU starts it) of the entry flow; the
# exit flow's first block (13) is the same with widths 728 then 1024.
ENTRY_BLOCKS = ((2, (128, 128), False), (3, (256, 256), True), (4, (728, 728), True))
EXIT_BLOCK = (13, (728, 1024), True)
MIDDLE_WIDTH = 728
MIN_INPUT_SIZE = 7  # the unpadded stem (two 3x3 convs, the first strided) leaves 1 px


class SeparableConv(hk.Module):
    """Keras' SeparableConv2D without bias: a depthwise conv (`depthwise`, one filter per input
    channel) then a 1x1 conv (`pointwise`), stride 1, TF "same" padding."""

    def __init__(self, out_channels: int, kernel_size: int = 3, name: str | None = None):
        super().__init__(name=name)
        self.out_channels, self.kernel_size = out_channels, kernel_size

    def __call__(self, x):
        c = x.shape[-1]
        x = layers.Conv(c, self.kernel_size, padding="same", groups=c, name="depthwise")(x)
        return layers.Conv(self.out_channels, 1, name="pointwise")(x)


class Xception(hk.Module):
    """Xception. `__call__` gives logits (pooled features when num_classes=0); `features` gives
    the outputs of entry blocks 2 and 3 (strides 4, 8), of the middle flow (16) and of the exit
    flow (32, after its last ReLU). The unpadded stem makes them smaller than input // stride:
    74, 37, 19, 10 at 299 px (`feature_sizes`).

    Args:
      middle_blocks: residual blocks of the middle flow (8).
      bn_decay, bn_eps: BatchNorm running-average decay (Keras' momentum) and eps.
    """

    def __init__(self, num_classes: int = 1000, middle_blocks: int = 8, in_channels: int = 3,
                 bn_decay: float = 0.99, bn_eps: float = 1e-3, name: str = "xception"):
        super().__init__(name=name)
        if int(middle_blocks) != middle_blocks or middle_blocks < 0:
            raise ValueError(f"middle_blocks must be a non-negative integer, got "
                             f"{middle_blocks!r}")
        self.num_classes, self.middle_blocks, self.in_channels = (num_classes, middle_blocks,
                                                                  in_channels)
        self.bn_decay, self.bn_eps = bn_decay, bn_eps

    @hk.name_like("__call__")
    def _bn(self, x, is_training, name):
        return layers.BatchNorm(self.bn_decay, self.bn_eps, unbiased_running_var=False,
                                name=name)(x, is_training)

    @hk.name_like("__call__")
    def _sep_bn(self, x, width, is_training, name):
        return self._bn(SeparableConv(width, name=name)(x), is_training, f"{name}_bn")

    @hk.name_like("__call__")
    def _downsampling_block(self, x, block, widths, first_relu, is_training):
        """Two separable conv-BNs (ReLU before each, but the first of block 2), a strided max
        pool, plus the strided 1x1 conv-BN of the block's input."""
        prefix = f"block{block}"
        shortcut = layers.Conv(widths[-1], 1, 2, padding="same", name=f"{prefix}_shortcut")(x)
        shortcut = self._bn(shortcut, is_training, f"{prefix}_shortcut_bn")
        for i, width in enumerate(widths, start=1):
            if i > 1 or first_relu:
                x = jax.nn.relu(x)
            x = self._sep_bn(x, width, is_training, f"{prefix}_sepconv{i}")
        return layers.max_pool(x, 3, 2, padding="same") + shortcut

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        if min(images.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"{self.module_name} needs images of at least {MIN_INPUT_SIZE} x "
                             f"{MIN_INPUT_SIZE} pixels, "
                             f"got {images.shape[1]} x {images.shape[2]}")
        x = layers.Conv(32, 3, 2, padding=0, name="block1_conv1")(images)
        x = jax.nn.relu(self._bn(x, is_training, "block1_conv1_bn"))
        x = layers.Conv(64, 3, padding=0, name="block1_conv2")(x)
        x = jax.nn.relu(self._bn(x, is_training, "block1_conv2_bn"))
        maps = {}
        for stage, (block, widths, first_relu) in enumerate(ENTRY_BLOCKS):
            x = self._downsampling_block(x, block, widths, first_relu, is_training)
            if stage < 2:
                maps[f"stage{stage + 1}"] = x
        for block in range(5, 5 + self.middle_blocks):
            y = x
            for i in range(1, 4):
                y = self._sep_bn(jax.nn.relu(y), MIDDLE_WIDTH, is_training,
                                 f"block{block}_sepconv{i}")
            x = x + y
        maps["stage3"] = x
        x = self._downsampling_block(x, *EXIT_BLOCK, is_training)
        for i, width in enumerate((1536, 2048), start=1):
            x = jax.nn.relu(self._sep_bn(x, width, is_training, f"block14_sepconv{i}"))
        maps["stage4"] = x
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)["stage4"]
        return layers.classifier(x, self.num_classes, is_training, name="predictions")


def feature_sizes(size: int) -> tuple[int, ...]:
    """The feature maps' height for an input of `size` pixels: the stem's two unpadded 3x3
    convs (the first strided), then four "same"-padded stride-2 max pools."""
    stem = (size - 3) // 2 + 1 - 2
    return tuple(-(-stem // 2 ** k) for k in (1, 2, 3, 4))


def keras_name(path: str, config: Mapping[str, Any]) -> str | tuple[str, int]:
    """Our dotted module path -> Keras' layer name: the same names, but the separable convs'
    halves (one Keras layer: depthwise kernel, then pointwise kernel) and the shortcuts, which
    Keras leaves unnamed: the i-th downsampling block's conv "conv2d_i", its BN
    "batch_normalization_i" (no suffix for the first)."""
    del config
    parts = path.split(".")
    if parts[-1] in ("depthwise", "pointwise"):
        return parts[0], 0 if parts[-1] == "depthwise" else 1
    blocks = [f"block{b}" for b, _, _ in (*ENTRY_BLOCKS, EXIT_BLOCK)]
    block, _, kind = path.partition("_")
    if kind.startswith("shortcut"):
        rank = blocks.index(block)
        auto = "batch_normalization" if kind.endswith("_bn") else "conv2d"
        return auto + (f"_{rank}" if rank else "")
    return path


VARIANTS = (
    # keras.applications.Xception; the counts are Keras' model's (its trainable weights, its
    # BatchNorm moving statistics), tests/test_keras_families.py.
    ModelInfo(name="xception", family="xception", builder=Xception, config={},
              reference="keras:Xception", reference_params=22855952,
              reference_params_no_head=20806952, reference_bn_stat_elems=54528,
              train_size=299, test_size=299,
              preprocessing=UNIT_RANGE_PREPROCESSING, feature_sizes=feature_sizes,
              min_input_size=MIN_INPUT_SIZE, classifier="predictions",
              keras_name=keras_name, keras_builder="Xception"),
)
