"""EfficientNet B0-B7 (Tan & Le 2019), exact to keras.applications (the official TF code's port).

One module, scaled by (width, depth) coefficients: channel counts are rounded by `round_filters`
(multiples of 8, never below 90%) and repeats by ceil(depth * repeats). MBConv blocks: 1x1
expansion (absent when the ratio is 1), depthwise conv, squeeze-excitation whose reduced width
is the block's *input* filters x se_ratio, linear 1x1 projection (no activation), and an
identity shortcut when stride 1 and widths match, with drop connect on the residual branch
(rate drop_connect_rate * block_index / num_blocks) and no activation after the add. Swish
everywhere, TF "SAME" padding, Keras BatchNorm (decay 0.99, eps 1e-3, biased running variance),
the official initialisers: convs N(0, 2 / fan_out) truncated (Keras), dense U(+-1/sqrt(fan_out)).

Module paths join with "_" into the Keras layer names ("block2a.se.reduce" is
"block2a_se_reduce"), which is what `nets.convert.from_keras` uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.records import ModelInfo, Preprocessing

# (kernel, repeats, filters_in, filters_out, expand_ratio, stride) of the seven B0 stages; every
# block has se_ratio 0.25 and an identity skip where shapes allow.
B0_STAGES = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2),
             (3, 3, 40, 80, 6, 2), (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2),
             (3, 1, 192, 320, 6, 1))

CONV_INIT = hk.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")
DEPTHWISE_INIT = layers.depthwise_fan_out_init(2.0, "truncated_normal")
DENSE_INIT = hk.initializers.VarianceScaling(1.0 / 3.0, "fan_out", "uniform")


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    return layers.make_divisible(filters * width, divisor)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


class MBConv(hk.Module):
    """Mobile inverted bottleneck with squeeze-excitation (Keras' `block`)."""

    def __init__(self, filters_out: int, kernel: int, stride: int, expand_ratio: int,
                 se_ratio: float, drop_rate: float, opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.filters_out, self.kernel, self.stride = filters_out, kernel, stride
        self.expand_ratio, self.se_ratio, self.drop_rate = expand_ratio, se_ratio, drop_rate
        self.opts = opts

    def __call__(self, inputs, is_training: bool):
        opts, act = self.opts, layers.activation(self.opts["activation"])
        bn = lambda name: layers.BatchNorm(opts["bn_decay"], opts["bn_eps"],  # noqa: E731
                                           unbiased_running_var=False, name=name)
        filters_in = inputs.shape[-1]
        filters = filters_in * self.expand_ratio
        x = inputs
        if self.expand_ratio != 1:
            x = layers.Conv(filters, 1, w_init=CONV_INIT, name="expand_conv")(x)
            x = act(bn("expand_bn")(x, is_training))
        x = layers.Conv(filters, self.kernel, self.stride, padding="same", groups=filters,
                        w_init=DEPTHWISE_INIT, name="dwconv")(x)
        x = act(bn("bn")(x, is_training))
        if 0 < self.se_ratio <= 1:
            reduced = max(1, int(filters_in * self.se_ratio))
            x = layers.SqueezeExcite(reduced, activation=act, w_init=CONV_INIT, b_init=jnp.zeros,
                                     names=("reduce", "expand"), name="se")(x)
        x = layers.Conv(self.filters_out, 1, w_init=CONV_INIT, name="project_conv")(x)
        x = bn("project_bn")(x, is_training)
        if self.stride == 1 and filters_in == self.filters_out:
            x = layers.stochastic_depth(x, self.drop_rate, is_training) + inputs
        return x


class EfficientNet(hk.Module):
    """EfficientNet. `__call__` gives logits (pooled features when num_classes=0); `features`
    gives {"stage1".."stage4"}: the last block outputs at strides 4, 8, 16 and 32.

    Args:
      width, depth: compound-scaling coefficients (B0: 1.0, 1.0).
      dropout_rate: dropout before the classifier.
      drop_connect_rate: drop rate of the residual branch, growing linearly from 0 with the
        block index (block b of N gets rate * b / N).
      activation, bn_decay, bn_eps: swish and Keras' BatchNorm constants by default.
    """

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000,
                 dropout_rate: float = 0.2, drop_connect_rate: float = 0.2,
                 se_ratio: float = 0.25, activation: str = "swish", bn_decay: float = 0.99,
                 bn_eps: float = 1e-3, in_channels: int = 3, name: str = "efficientnet"):
        super().__init__(name=name)
        self.width, self.depth = width, depth
        self.num_classes, self.in_channels = num_classes, in_channels
        self.dropout_rate, self.drop_connect_rate = dropout_rate, drop_connect_rate
        self.se_ratio = se_ratio
        self.opts = dict(activation=activation, bn_decay=bn_decay, bn_eps=bn_eps)
        layers.activation(activation)  # an unknown name fails here, not deep inside a block

    @hk.name_like("__call__")
    def _bn(self, name):
        return layers.BatchNorm(self.opts["bn_decay"], self.opts["bn_eps"],
                                unbiased_running_var=False, name=name)

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        act = layers.activation(self.opts["activation"])
        x = layers.Conv(round_filters(32, self.width), 3, 2, padding="same", w_init=CONV_INIT,
                        name="stem_conv")(images)
        x = act(self._bn("stem_bn")(x, is_training))
        total = sum(round_repeats(r, self.depth) for _, r, *_ in B0_STAGES)
        index, stride, maps = 0, 2, {}
        for s, (kernel, repeats, _, filters_out, expand, first_stride) in enumerate(B0_STAGES):
            for j in range(round_repeats(repeats, self.depth)):
                x = MBConv(round_filters(filters_out, self.width), kernel,
                           first_stride if j == 0 else 1, expand, self.se_ratio,
                           self.drop_connect_rate * index / total, self.opts,
                           name=f"block{s + 1}{chr(j + 97)}")(x, is_training)
                index += 1
            stride *= first_stride
            if stride >= 4:  # the last stage at each stride overwrites the earlier ones
                maps[f"stage{int(math.log2(stride)) - 1}"] = x
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)["stage4"]
        x = layers.Conv(round_filters(1280, self.width), 1, w_init=CONV_INIT, name="top_conv")(x)
        x = layers.activation(self.opts["activation"])(self._bn("top_bn")(x, is_training))
        return layers.classifier(x, self.num_classes, is_training,
                                 dropout_rate=self.dropout_rate, name="predictions",
                                 w_init=DENSE_INIT, b_init=jnp.zeros)


def keras_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path -> the Keras layer name ("block2a.se.reduce" -> block2a_se_reduce)."""
    return path.replace(".", "_")


# ----------------------------------------------------------------------------------------------
# Variants: (width, depth, resolution, dropout) of the paper and keras.applications. Counts are
# torchvision's/timm's (../shared/reference/params.json), which equal Keras' trainable ones.

SCALING = {0: (1.0, 1.0, 224, 0.2), 1: (1.0, 1.1, 240, 0.2), 2: (1.1, 1.2, 260, 0.3),
           3: (1.2, 1.4, 300, 0.3), 4: (1.4, 1.8, 380, 0.4), 5: (1.6, 2.2, 456, 0.4),
           6: (1.8, 2.6, 528, 0.5), 7: (2.0, 3.1, 600, 0.5)}
COUNTS = {0: (5288548, 4007548, 42016), 1: (7794184, 6513184, 62048),
          2: (9109994, 7700994, 67568), 3: (12233232, 10696232, 87296),
          4: (19341616, 17548616, 125200), 5: (30389784, 28340784, 172736),
          6: (43040704, 40735704, 224432), 7: (66347960, 63786960, 310720)}


def _variant(k: int) -> ModelInfo:
    width, depth, size, dropout = SCALING[k]
    with_head, no_head, bn_stats = COUNTS[k]
    # The official eval: centre crop of size / (size + 32) of the image, bicubic resize.
    return ModelInfo(
        name=f"efficientnet_b{k}", family="efficientnet", builder=EfficientNet,
        config=dict(width=width, depth=depth, dropout_rate=dropout),
        reference=f"keras:EfficientNetB{k}", reference_params=with_head,
        reference_params_no_head=no_head, reference_bn_stat_elems=bn_stats,
        train_size=size, test_size=size,
        preprocessing=Preprocessing(crop_fraction=size / (size + 32), interpolation="bicubic",
                                    eval_preprocess="crop_resize", image_ops="tf"),
        classifier="predictions", keras_name=keras_name, keras_builder=f"EfficientNetB{k}")


VARIANTS = tuple(_variant(k) for k in range(8))
