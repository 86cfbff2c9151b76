"""MobileNet V1 (Howard et al. 2017), V2 (Sandler et al. 2018) and V3 (Howard et al. 2019).

Two references, one module per architecture; the reference decides padding, BatchNorm constants
and weight names, so each is a registered variant:
- keras.applications (`mobilenet_v1*`, `keras_mobilenet_v2`, `keras_mobilenet_v3_*`): TF
  "SAME" padding (Keras MobileNet V1 pads its stride-2 depthwise convs by (0, 1), which is SAME
  on even sizes only, and is kept exactly), Keras BatchNorm (biased running variance, eps 1e-3,
  decay 0.99 for V1 and 0.999 for V2/V3), no dropout in V2.
- torchvision (`mobilenet_v2`, `mobilenet_v3_large`, `mobilenet_v3_small`): symmetric padding,
  PyTorch BatchNorm (V2: decay 0.9, eps 1e-5; V3: decay 0.99, eps 1e-3), dropout 0.2.

Width multipliers (`alpha`) round channels as each reference does at 1.0; below 1.0 V2/V3 follow
torchvision (make_divisible(c * alpha, 8) for every width, the pre-logits width included).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.records import UNIT_RANGE_PREPROCESSING, ModelInfo, Preprocessing

KERAS_V1_PAD = ((0, 1), (0, 1))
# torchvision's classifier init (and the paper codebases'): N(0, 0.01), zero bias.
CLASSIFIER_INIT = dict(w_init=hk.initializers.RandomNormal(0.01), b_init=jnp.zeros)


def _width(channels: float, alpha: float) -> int:
    return layers.make_divisible(channels * alpha, 8)


# (expansion t, channels c, repeats n, first stride s): the MobileNetV2 paper's Table 2.
V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))


def v2_blocks(alpha: float) -> list[tuple[int, int, int, int, int, str]]:
    """(kernel, expanded, out, stride, se_reduced, activation) of every MobileNetV2 block."""
    rows, c_in = [], _width(32, alpha)
    for t, c, n, s in V2_SETTINGS:
        out = _width(c, alpha)
        for j in range(n):
            rows.append((3, int(round(c_in * t)), out, s if j == 0 else 1, 0, "relu6"))
            c_in = out
    return rows


# (kernel, expanded, out, SE, activation, stride): torchvision's tables (the paper's 1 and 2).
V3_TABLES = {
    "large": ((3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2),
              (3, 72, 24, False, "relu", 1), (5, 72, 40, True, "relu", 2),
              (5, 120, 40, True, "relu", 1), (5, 120, 40, True, "relu", 1),
              (3, 240, 80, False, "hard_swish", 2), (3, 200, 80, False, "hard_swish", 1),
              (3, 184, 80, False, "hard_swish", 1), (3, 184, 80, False, "hard_swish", 1),
              (3, 480, 112, True, "hard_swish", 1), (3, 672, 112, True, "hard_swish", 1),
              (5, 672, 160, True, "hard_swish", 2), (5, 960, 160, True, "hard_swish", 1),
              (5, 960, 160, True, "hard_swish", 1)),
    "small": ((3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2),
              (3, 88, 24, False, "relu", 1), (5, 96, 40, True, "hard_swish", 2),
              (5, 240, 40, True, "hard_swish", 1), (5, 240, 40, True, "hard_swish", 1),
              (5, 120, 48, True, "hard_swish", 1), (5, 144, 48, True, "hard_swish", 1),
              (5, 288, 96, True, "hard_swish", 2), (5, 576, 96, True, "hard_swish", 1),
              (5, 576, 96, True, "hard_swish", 1)),
}
PRE_LOGITS = {"large": 1280, "small": 1024}


def v3_blocks(size: str, alpha: float, reduced_tail: bool):
    """(kernel, expanded, out, stride, se_reduced, activation) of every MobileNetV3 block.
    `reduced_tail` halves the last stage (from its stride-2 block on, whose expansion stays)."""
    table = V3_TABLES[size]
    tail = max(i for i, row in enumerate(table) if row[-1] == 2)
    rows = []
    for i, (kernel, expanded, out, se, act, stride) in enumerate(table):
        div = 2 if reduced_tail and i >= tail else 1
        expanded = _width(expanded // div if i > tail else expanded, alpha)
        out = _width(out // div, alpha)
        se_reduced = layers.make_divisible(expanded // 4, 8) if se else 0
        rows.append((kernel, expanded, out, stride, se_reduced, act))
    return rows


def _stage_maps(outputs: Sequence[tuple[int, jax.Array]]) -> dict[str, jax.Array]:
    """{(stride, map)} in network order -> {"stage1".."stage4"}: the last map at strides
    4, 8, 16, 32."""
    maps = {}
    for stride, x in outputs:
        if stride in (4, 8, 16, 32):
            maps[f"stage{stride.bit_length() - 2}"] = x
    return maps


def _classify(x, num_classes, dropout_rate, is_training, name):
    """Dropout, then the classifier; pooled features unchanged when num_classes is 0."""
    if num_classes:
        if is_training and dropout_rate > 0:
            x = hk.dropout(hk.next_rng_key(), dropout_rate, x)
        x = layers.Linear(num_classes, **CLASSIFIER_INIT, name=name)(x)
    return x


def _pool(x):
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # logits in float32 under any policy


class MobileNetV1(hk.Module):
    """Depthwise-separable stack of keras.applications.MobileNet (depth multiplier 1).
    Module names are Keras' layer names ("conv_dw_3_bn")."""

    STACK = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *((512, 1),) * 5,
             (1024, 2), (1024, 1))

    def __init__(self, alpha: float = 1.0, num_classes: int = 1000, dropout_rate: float = 1e-3,
                 bn_decay: float = 0.99, bn_eps: float = 1e-3, in_channels: int = 3,
                 name: str = "mobilenet_v1"):
        super().__init__(name=name)
        self.alpha, self.num_classes, self.in_channels = alpha, num_classes, in_channels
        self.dropout_rate, self.bn_decay, self.bn_eps = dropout_rate, bn_decay, bn_eps

    @hk.name_like("__call__")
    def _conv_bn(self, x, width, kernel, stride, name, is_training, groups=1):
        pad = "same" if stride == 1 or groups == 1 else KERAS_V1_PAD
        x = layers.Conv(width, kernel, stride, padding=pad, groups=groups, name=name)(x)
        x = layers.BatchNorm(self.bn_decay, self.bn_eps, unbiased_running_var=False,
                             name=f"{name}_bn")(x, is_training)
        return jax.nn.relu6(x)

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        x = self._conv_bn(images, int(32 * self.alpha), 3, 2, "conv1", is_training)
        stride, outputs = 2, []
        for i, (filters, s) in enumerate(self.STACK, start=1):
            x = self._conv_bn(x, x.shape[-1], 3, s, f"conv_dw_{i}", is_training,
                              groups=x.shape[-1])
            x = self._conv_bn(x, int(filters * self.alpha), 1, 1, f"conv_pw_{i}", is_training)
            stride *= s
            outputs.append((stride, x))
        return _stage_maps(outputs)

    def __call__(self, images, is_training: bool):
        x = _pool(self.features(images, is_training)["stage4"])
        return _classify(x, self.num_classes, self.dropout_rate, is_training, "conv_preds")


class InvertedResidual(hk.Module):
    """Expand 1x1 (absent when `expanded` equals the input width), depthwise k x k, optional
    squeeze-excitation (hard-sigmoid gate), linear 1x1 projection; identity shortcut when the
    stride is 1 and the widths match."""

    def __init__(self, kernel: int, expanded: int, out: int, stride: int, se_reduced: int,
                 activation: str, opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.kernel, self.expanded, self.out, self.stride = kernel, expanded, out, stride
        self.se_reduced, self.act = se_reduced, layers.activation(activation)
        self.opts = opts

    @hk.name_like("__call__")
    def _bn(self, name):
        o = self.opts
        return layers.BatchNorm(o["bn_decay"], o["bn_eps"], o["unbiased_running_var"], name=name)

    def __call__(self, inputs, is_training: bool):
        pad, x = self.opts["padding"], inputs
        if self.expanded != inputs.shape[-1]:
            x = layers.Conv(self.expanded, 1, name="expand_conv")(x)
            x = self.act(self._bn("expand_bn")(x, is_training))
        x = layers.Conv(self.expanded, self.kernel, self.stride, padding=pad,
                        groups=self.expanded, name="dw_conv")(x)
        x = self.act(self._bn("dw_bn")(x, is_training))
        if self.se_reduced:
            x = layers.SqueezeExcite(self.se_reduced, gate=jax.nn.hard_sigmoid,
                                     b_init=jnp.zeros, name="se")(x)
        x = layers.Conv(self.out, 1, name="project_conv")(x)
        x = self._bn("project_bn")(x, is_training)
        if self.stride == 1 and inputs.shape[-1] == self.out:
            x = x + inputs
        return x


class _InvertedResidualNet(hk.Module):
    """What V2 and V3 share: stem conv-BN-act, a table of inverted residual blocks, a 1x1
    head conv-BN-act. Subclasses give the table and the classifier."""

    stem_activation = "relu6"

    def __init__(self, alpha, num_classes, dropout_rate, padding, bn_decay, bn_eps,
                 unbiased_running_var, in_channels, name):
        super().__init__(name=name)
        self.alpha, self.num_classes, self.in_channels = alpha, num_classes, in_channels
        self.dropout_rate = dropout_rate
        self.opts = dict(padding=padding, bn_decay=bn_decay, bn_eps=bn_eps,
                         unbiased_running_var=unbiased_running_var)

    def blocks(self) -> list[tuple[int, int, int, int, int, str]]:
        """(kernel, expanded, out, stride, se_reduced, activation) per block."""
        raise NotImplementedError

    @hk.name_like("__call__")
    def _conv_bn_act(self, x, width, kernel, stride, name, activation, is_training):
        x = layers.Conv(width, kernel, stride, padding=self.opts["padding"],
                        name=f"{name}_conv")(x)
        o = self.opts
        x = layers.BatchNorm(o["bn_decay"], o["bn_eps"], o["unbiased_running_var"],
                             name=f"{name}_bn")(x, is_training)
        return layers.activation(activation)(x)

    @hk.name_like("__call__")
    def _body(self, images, is_training):
        layers.check_images(images, self.module_name, self.in_channels)
        x = self._conv_bn_act(images, self.stem_width(), 3, 2, "stem", self.stem_activation,
                              is_training)
        stride, outputs = 2, []
        for i, (kernel, expanded, out, s, se, act) in enumerate(self.blocks()):
            x = InvertedResidual(kernel, expanded, out, s, se, act, self.opts,
                                 name=f"block{i}")(x, is_training)
            stride *= s
            outputs.append((stride, x))
        return outputs

    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        """{"stage1".."stage4"}: the last block outputs at strides 4, 8, 16, 32."""
        return _stage_maps(self._body(images, is_training))


class MobileNetV2(_InvertedResidualNet):
    """Inverted residuals with linear bottlenecks, ReLU6. `padding`/`bn_*`/`dropout_rate` pick
    the reference (torchvision defaults; the keras variant overrides them)."""

    def __init__(self, alpha: float = 1.0, num_classes: int = 1000, dropout_rate: float = 0.2,
                 padding: layers.Padding = "torch", bn_decay: float = 0.9, bn_eps: float = 1e-5,
                 unbiased_running_var: bool = True, in_channels: int = 3,
                 name: str = "mobilenet_v2"):
        super().__init__(alpha, num_classes, dropout_rate, padding, bn_decay, bn_eps,
                         unbiased_running_var, in_channels, name)

    def stem_width(self) -> int:
        return _width(32, self.alpha)

    def blocks(self):
        return v2_blocks(self.alpha)

    def __call__(self, images, is_training: bool):
        x = self._body(images, is_training)[-1][1]
        width = layers.make_divisible(1280 * max(1.0, self.alpha), 8)
        x = self._conv_bn_act(x, width, 1, 1, "head", "relu6", is_training)
        return _classify(_pool(x), self.num_classes, self.dropout_rate, is_training,
                         "classifier")


class MobileNetV3(_InvertedResidualNet):
    """MobileNetV3 Large/Small: the NAS'd block tables, SE with hard-sigmoid gates, hard-swish,
    and the efficient last stage (pool, then 1x1 "pre_logits" + hard-swish, then classifier).
    `reduced_tail` halves the channels of the last stage (torchvision's option).

    `pre_logits=False` leaves out the pre-logits layer as well as the classifier (what Keras'
    include_top=False keeps): `__call__` then returns the pooled head-conv features.
    """

    stem_activation = "hard_swish"

    def __init__(self, size: str = "large", alpha: float = 1.0, num_classes: int = 1000,
                 dropout_rate: float = 0.2, reduced_tail: bool = False, pre_logits: bool = True,
                 padding: layers.Padding = "torch", bn_decay: float = 0.99, bn_eps: float = 1e-3,
                 unbiased_running_var: bool = True, in_channels: int = 3,
                 name: str = "mobilenet_v3"):
        super().__init__(alpha, num_classes, dropout_rate, padding, bn_decay, bn_eps,
                         unbiased_running_var, in_channels, name)
        if size not in PRE_LOGITS:
            raise ValueError(f"size must be 'large' or 'small', got {size!r}")
        self.size, self.reduced_tail, self.pre_logits = size, reduced_tail, pre_logits

    def stem_width(self) -> int:
        return _width(16, self.alpha)

    def blocks(self):
        return v3_blocks(self.size, self.alpha, self.reduced_tail)

    def __call__(self, images, is_training: bool):
        x = self._body(images, is_training)[-1][1]
        x = self._conv_bn_act(x, 6 * x.shape[-1], 1, 1, "head", "hard_swish", is_training)
        x = _pool(x)
        if not self.pre_logits:
            return x
        div = 2 if self.reduced_tail else 1
        x = layers.Linear(_width(PRE_LOGITS[self.size] // div, self.alpha), **CLASSIFIER_INIT,
                          name="pre_logits")(x)
        return _classify(jax.nn.hard_swish(x), self.num_classes, self.dropout_rate, is_training,
                         "classifier")


# ----------------------------------------------------------------------------------------------
# Names of the reference implementations.


def _block_parts(path: str):
    m = re.fullmatch(r"block(\d+)\.(\w+?)(?:\.(fc[12]))?", path)
    return (int(m[1]), m[2], m[3]) if m else None


def keras_v1_name(path: str, config: Mapping[str, Any]) -> str:
    return path


_KERAS_V2_TOP = {"stem_conv": "Conv1", "stem_bn": "bn_Conv1", "head_conv": "Conv_1",
                 "head_bn": "Conv_1_bn", "classifier": "predictions"}
_KERAS_V2_BLOCK = {"expand_conv": "expand", "expand_bn": "expand_BN", "dw_conv": "depthwise",
                   "dw_bn": "depthwise_BN", "project_conv": "project", "project_bn": "project_BN"}


def keras_v2_name(path: str, config: Mapping[str, Any]) -> str:
    if path in _KERAS_V2_TOP:
        return _KERAS_V2_TOP[path]
    block, part, _ = _block_parts(path)
    prefix = f"block_{block}_" if block else "expanded_conv_"
    return prefix + _KERAS_V2_BLOCK[part]


_KERAS_V3_TOP = {"stem_conv": "conv", "stem_bn": "conv_bn", "head_conv": "conv_1",
                 "head_bn": "conv_1_bn", "pre_logits": "conv_2", "classifier": "logits"}
_KERAS_V3_BLOCK = {"expand_conv": "expand", "expand_bn": "expand_bn", "dw_conv": "depthwise",
                   "dw_bn": "depthwise_bn", "project_conv": "project", "project_bn": "project_bn"}


def keras_v3_name(path: str, config: Mapping[str, Any]) -> str:
    if path in _KERAS_V3_TOP:
        return _KERAS_V3_TOP[path]
    block, part, fc = _block_parts(path)
    prefix = f"expanded_conv_{block}_" if block else "expanded_conv_"
    if part == "se":
        return prefix + ("squeeze_excite_conv" if fc == "fc1" else "squeeze_excite_conv_1")
    return prefix + _KERAS_V3_BLOCK[part]


def _torch_block_part(block: int, part: str, fc: str | None, rows, stem_width: int) -> str:
    """torchvision's blocks are Sequentials of [expand], depthwise, [SE], project: a part's index
    depends on which parts the block has."""
    _, expanded, _, _, se, _ = rows[block]
    c_in = rows[block - 1][2] if block else stem_width
    order = ["expand"] * (expanded != c_in) + ["dw"] + ["se"] * bool(se) + ["project"]
    if part == "se":
        return f"{order.index('se')}.{fc}"
    kind, leaf = part.split("_")
    return f"{order.index(kind)}.{0 if leaf == 'conv' else 1}"


def torch_v2_name(path: str, config: Mapping[str, Any]) -> str:
    alpha = config.get("alpha", 1.0)
    rows = v2_blocks(alpha)
    top = {"stem_conv": "features.0.0", "stem_bn": "features.0.1",
           "head_conv": f"features.{len(rows) + 1}.0", "head_bn": f"features.{len(rows) + 1}.1",
           "classifier": "classifier.1"}
    if path in top:
        return top[path]
    block, part, fc = _block_parts(path)
    index = _torch_block_part(block, part, fc, rows, _width(32, alpha))
    if part.startswith("project"):  # V2's projection is a bare conv and BN, not a ConvBNAct
        kind_index = int(index.split(".")[0])
        index = str(kind_index + (part == "project_bn"))
    return f"features.{block + 1}.conv.{index}"


def torch_v3_name(path: str, config: Mapping[str, Any]) -> str:
    alpha = config.get("alpha", 1.0)
    rows = v3_blocks(config.get("size", "large"), alpha, config.get("reduced_tail", False))
    top = {"stem_conv": "features.0.0", "stem_bn": "features.0.1",
           "head_conv": f"features.{len(rows) + 1}.0", "head_bn": f"features.{len(rows) + 1}.1",
           "pre_logits": "classifier.0", "classifier": "classifier.3"}
    if path in top:
        return top[path]
    block, part, fc = _block_parts(path)
    index = _torch_block_part(block, part, fc, rows, _width(16, alpha))
    return f"features.{block + 1}.block.{index}"


# ----------------------------------------------------------------------------------------------
# Variants. Counts: ../shared/reference/params.json; Keras and torchvision agree on full models.

KERAS_V2 = dict(padding="same", bn_decay=0.999, bn_eps=1e-3, unbiased_running_var=False,
                dropout_rate=0.0)
KERAS_V3 = dict(padding="same", bn_decay=0.999, bn_eps=1e-3, unbiased_running_var=False)
# The smaller input sizes keras.applications has ImageNet weights for (besides 224).
KERAS_V1_SIZES = (128, 160, 192)
KERAS_V2_SIZES = (96, 128, 160, 192)
# Keras MobileNets take inputs scaled to [-1, 1] ("tf" mode); torchvision's the ImageNet mean/std.
KERAS_INPUTS = UNIT_RANGE_PREPROCESSING


TORCH_INPUTS = Preprocessing()


def _variant(name, builder, reference, counts, classifier, preprocessing=TORCH_INPUTS,
             torch_name=None, keras_name=None, keras_builder=None,
             resolution=224, **config) -> ModelInfo:
    with_head, no_head, bn_stats = counts or (None, None, None)
    return ModelInfo(name=name, family="mobilenet", builder=builder, config=config,
                     reference=reference, reference_params=with_head,
                     reference_params_no_head=no_head, reference_bn_stat_elems=bn_stats,
                     train_size=resolution, test_size=resolution, preprocessing=preprocessing,
                     classifier=classifier, torch_name=torch_name, keras_name=keras_name,
                     keras_builder=keras_builder)


V1_COUNTS = (4231976, 3206976, 21888)
V2_COUNTS = (3504872, 2223872, 34112)
V3_LARGE_COUNTS = (5483032, 4202032, 24400)
V3_SMALL_COUNTS = (2542856, 1517856, 12112)

VARIANTS = (
    # timm's mobilenetv1_100 has Keras' layers (its padding is symmetric): the count is shared.
    _variant("mobilenet_v1", MobileNetV1, "keras:MobileNet", V1_COUNTS,
             "conv_preds", KERAS_INPUTS, keras_name=keras_v1_name, keras_builder="MobileNet"),
    *(_variant(f"mobilenet_v1_{int(a * 100):03d}", MobileNetV1, f"keras:MobileNet(alpha={a})",
               None, "conv_preds", KERAS_INPUTS, keras_name=keras_v1_name,
               keras_builder="MobileNet", alpha=a)
      for a in (0.75, 0.5, 0.25)),
    # The resolution multiplier (the MobileNet paper's rho): the same networks trained and
    # evaluated at the smaller inputs keras.applications has weights for; the name ends in the
    # input size ("mobilenet_v1_050_160" is alpha 0.5 at 160 px).
    *(_variant(f"mobilenet_v1{'' if a == 1 else f'_{int(a * 100):03d}'}_{px}", MobileNetV1,
               f"keras:MobileNet(alpha={a}, input_shape=({px}, {px}, 3))",
               V1_COUNTS if a == 1 else None, "conv_preds", KERAS_INPUTS,
               keras_name=keras_v1_name, keras_builder="MobileNet", resolution=px,
               **({} if a == 1 else {"alpha": a}))
      for a in (1.0, 0.75, 0.5, 0.25) for px in KERAS_V1_SIZES),
    _variant("mobilenet_v2", MobileNetV2, "torchvision:mobilenet_v2", V2_COUNTS, "classifier",
             torch_name=torch_v2_name),
    _variant("keras_mobilenet_v2", MobileNetV2, "keras:MobileNetV2", V2_COUNTS, "classifier",
             KERAS_INPUTS, keras_name=keras_v2_name, keras_builder="MobileNetV2", **KERAS_V2),
    *(_variant(f"keras_mobilenet_v2_{px}", MobileNetV2,
               f"keras:MobileNetV2(input_shape=({px}, {px}, 3))", V2_COUNTS, "classifier",
               KERAS_INPUTS, keras_name=keras_v2_name, keras_builder="MobileNetV2",
               resolution=px, **KERAS_V2)
      for px in KERAS_V2_SIZES),
    _variant("mobilenet_v3_large", MobileNetV3, "torchvision:mobilenet_v3_large",
             V3_LARGE_COUNTS, "classifier", torch_name=torch_v3_name, size="large"),
    _variant("mobilenet_v3_small", MobileNetV3, "torchvision:mobilenet_v3_small",
             V3_SMALL_COUNTS, "classifier", torch_name=torch_v3_name, size="small"),
    _variant("keras_mobilenet_v3_large", MobileNetV3, "keras:MobileNetV3Large", V3_LARGE_COUNTS,
             "classifier", KERAS_INPUTS, keras_name=keras_v3_name,
             keras_builder="MobileNetV3Large", size="large", **KERAS_V3),
    _variant("keras_mobilenet_v3_small", MobileNetV3, "keras:MobileNetV3Small", V3_SMALL_COUNTS,
             "classifier", KERAS_INPUTS, keras_name=keras_v3_name,
             keras_builder="MobileNetV3Small", size="small", **KERAS_V3),
)
