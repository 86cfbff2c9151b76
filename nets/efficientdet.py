"""EfficientDet D0-D7x (Tan, Pang & Le 2020), exact to the official google/automl code.

The backbone is this codebase's EfficientNet-Bx without its head (`EfficientNet.features`:
C3, C4, C5 = the last blocks at strides 8, 16, 32); a BiFPN (`nets.bifpn`) adds P6, P7 (P8)
and fuses P3..P7 (P8) over `fpn_cells` cells; a class net and a box net, each `head_repeats` x
(separable 3x3 conv -> BN -> swish) and a separable 3x3 predict conv, run on every level with
their convs shared across levels and a BatchNorm per (repeat, level).

`__call__` returns the raw head outputs, NHWC, one array per level from min_level up:
{"class": [[B, H_l, W_l, A * num_classes]], "box": [[B, H_l, W_l, A * 4]]}, A anchors per
location (the channel layout anchor-major: reshape to [..., A, K] / [..., A, 4], box codes
(ty, tx, th, tw)); num_classes=0 leaves out the class net and "class". With
`points_per_cell` P > 0 the head is the design notes' anchor-free point head (spec §18): the
box net is replaced by a point net, {"class": [[B, H_l, W_l, P * num_classes]], "point":
[[B, H_l, W_l, P * 2]]}, slot-major, the point channels in-cell (y, x) logits
(`detection.keypoints` encodes, scores and decodes them). `features` returns the
BiFPN's outputs as {"stage1": P3, ...} at strides 8..128 (256 with P8). Anchors, box coding
and post-processing are the detection task's, parametrised by the row's `task_metadata`.

Weights convert from effdet's `tf_efficientdet_*` (`torch_name`) and from the official
google/automl checkpoints (`official_name`: the Keras model's variable names, spec §19.1).

Inits as the official Keras model: BiFPN kernels Glorot-uniform; head kernels variance
scaling (1, fan-in, truncated normal) with Keras' fans for depthwise kernels; biases zero but
the class predict bias, -log((1 - 0.01) / 0.01) (a prior of 0.01 per anchor and class).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import bifpn, efficientnet, layers
from nets.records import ModelInfo, Preprocessing

HEAD_INIT = hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
CLASS_PRIOR = 0.01


class HeadNet(hk.Module):
    """`repeats` x (separable conv shared across levels -> BN of its own per level -> act),
    then the shared separable predict conv to `num_outputs` channels."""

    def __init__(self, num_outputs: int, repeats: int, activation: str,
                 predict_bias: float = 0.0, name: str | None = None):
        super().__init__(name=name)
        self.num_outputs, self.repeats, self.activation = num_outputs, repeats, activation
        self.predict_bias = predict_bias

    def __call__(self, maps: Sequence[jax.Array], is_training: bool) -> list[jax.Array]:
        width, act = maps[0].shape[-1], layers.activation(self.activation)
        dw_init = bifpn.keras_depthwise(HEAD_INIT)
        convs = [bifpn.SeparableConv(width, dw_init=dw_init, pw_init=HEAD_INIT,
                                     name=f"conv_rep_{i}") for i in range(self.repeats)]
        predict = bifpn.SeparableConv(self.num_outputs, dw_init=dw_init, pw_init=HEAD_INIT,
                                      b_init=hk.initializers.Constant(self.predict_bias),
                                      name="predict")
        outputs = []
        for level, x in enumerate(maps):
            for i, conv in enumerate(convs):
                x = act(bifpn.batch_norm(f"bn_rep_{i}_{level}")(conv(x), is_training))
            outputs.append(predict(x))
        return outputs


class EfficientDet(hk.Module):
    """EfficientDet. See the module docstring for the outputs.

    Args:
      backbone: k of the EfficientNet-Bk backbone (its width and depth coefficients), or a
        (width, depth) pair of its own (small models for tests).
      fpn_width, fpn_cells: the BiFPN's channels W and number of cells D.
      head_repeats: conv repeats of the class and box nets.
      num_classes: classes of the class net (90: COCO ids 1..90, the official heads).
      num_anchors: anchors per location (scales x aspect ratios).
      min_level, max_level: the pyramid's levels (3..7; D7x 3..8).
      fusion: "fastattn" (fast normalised fusion) or "sum".
      drop_connect_rate: the backbone's (official: 0 for B0, 0.2 otherwise).
      points_per_cell: 0 for the box head; P > 0 for the point head with P point slots per
        cell (num_anchors is then not used).
    """

    def __init__(self, backbone: int | tuple[float, float] = 0, fpn_width: int = 64,
                 fpn_cells: int = 3, head_repeats: int = 3, num_classes: int = 90,
                 num_anchors: int = 9, min_level: int = 3, max_level: int = 7,
                 fusion: str = "fastattn", drop_connect_rate: float = 0.0,
                 activation: str = "swish",
                 in_channels: int = 3, points_per_cell: int = 0, name: str = "efficientdet"):
        super().__init__(name=name)
        if min_level != 3:
            raise ValueError(f"min_level must be 3 (the backbone gives C3-C5), got {min_level}")
        self.backbone, self.fpn_width, self.fpn_cells = backbone, fpn_width, fpn_cells
        self.head_repeats, self.num_classes, self.num_anchors = (head_repeats, num_classes,
                                                                 num_anchors)
        self.min_level, self.max_level, self.fusion = min_level, max_level, fusion
        self.drop_connect_rate, self.activation = drop_connect_rate, activation
        self.in_channels, self.points_per_cell = in_channels, points_per_cell

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        width, depth = (efficientnet.SCALING[self.backbone][:2]
                        if isinstance(self.backbone, int) else self.backbone)
        net = efficientnet.EfficientNet(width, depth, num_classes=0,
                                        drop_connect_rate=self.drop_connect_rate,
                                        activation=self.activation, in_channels=self.in_channels,
                                        name="backbone")
        stages = net.features(images, is_training)
        maps = bifpn.BiFPN(self.fpn_width, self.fpn_cells, self.min_level, self.max_level,
                           self.fusion, self.activation, name="fpn")(
            [stages["stage2"], stages["stage3"], stages["stage4"]], images.shape[1:3],
            is_training)
        return {f"stage{i + 1}": x for i, x in enumerate(maps)}

    def __call__(self, images, is_training: bool) -> dict[str, list[jax.Array]]:
        maps = list(self.features(images, is_training).values())
        slots, out = self.points_per_cell or self.num_anchors, {}
        if self.num_classes:
            prior = -math.log((1 - CLASS_PRIOR) / CLASS_PRIOR)
            out["class"] = HeadNet(slots * self.num_classes, self.head_repeats,
                                   self.activation, prior, name="class_net")(maps, is_training)
        # The point head keeps the trunk on every level, so that no BiFPN node is left
        # without a consumer; the keypoint code reads the levels its task_metadata names.
        kind, coords = ("point", 2) if self.points_per_cell else ("box", 4)
        out[kind] = HeadNet(slots * coords, self.head_repeats, self.activation,
                            name=f"{kind}_net")(maps, is_training)
        return jax.tree.map(lambda x: x.astype(jnp.float32), out)


# ----------------------------------------------------------------------------------------------
# effdet's `tf_efficientdet_*` names (its backbone: timm's `tf_efficientnet_bx`).

_BACKBONE_LEAVES = {  # ours -> timm's, in blocks with an expansion conv / without (stage 1)
    "expand_conv": ("conv_pw", None), "expand_bn": ("bn1", None),
    "dwconv": ("conv_dw", "conv_dw"), "bn": ("bn2", "bn1"),
    "se.reduce": ("se.conv_reduce", "se.conv_reduce"),
    "se.expand": ("se.conv_expand", "se.conv_expand"),
    "project_conv": ("conv_pwl", "conv_pw"), "project_bn": ("bn3", "bn2")}


def torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Our module path -> effdet's module name ("fpn.cell_1.node_4.conv.conv_dw" ->
    "fpn.cell.1.fnode.4.after_combine.conv.conv_dw")."""
    if path == "backbone.stem_conv":
        return "backbone.conv_stem"
    if path == "backbone.stem_bn":
        return "backbone.bn1"
    m = re.fullmatch(r"backbone\.block(\d+)([a-z])\.(.+)", path)
    if m:
        stage, block, rest = int(m[1]) - 1, ord(m[2]) - ord("a"), m[3]
        expands = efficientnet.B0_STAGES[stage][4] != 1
        return f"backbone.blocks.{stage}.{block}.{_BACKBONE_LEAVES[rest][0 if expands else 1]}"
    m = re.fullmatch(r"fpn\.resample_p(\d+)\.(conv|bn)", path)
    if m:
        return f"fpn.resample.{int(m[1]) - config.get('min_level', 3)}.conv.{m[2]}"
    m = re.fullmatch(r"fpn\.cell_(\d+)\.node_(\d+)(.*)", path)
    if m:
        node, rest = f"fpn.cell.{m[1]}.fnode.{m[2]}", m[3]
        if rest == "":  # the node's own parameter: the fusion weights
            return f"{node}.combine"
        r = re.fullmatch(r"\.resample_(\d+)\.(conv|bn)", rest)
        if r:
            return f"{node}.combine.resample.{r[1]}.conv.{r[2]}"
        return f"{node}.after_combine.conv{rest.removeprefix('.conv')}"
    m = re.fullmatch(r"(class_net|box_net)\.(conv_rep_(\d+)|bn_rep_(\d+)_(\d+)|predict)(.*)", path)
    if m:
        if m[3] is not None:
            return f"{m[1]}.conv_rep.{m[3]}{m[6]}"
        if m[4] is not None:
            return f"{m[1]}.bn_rep.{m[4]}.{m[5]}.bn"
        return f"{m[1]}.predict{m[6]}"
    raise ValueError(f"no effdet name for {path!r}")


# ----------------------------------------------------------------------------------------------
# The official google/automl Keras model's variable names (efficientdet/tf2/efficientdet_keras.py
# with the backbone of efficientdet/backbone/efficientnet_model.py; the same names as the TF1
# graph, efficientdet_arch.py, whose checkpoints are the released ones). The Keras model is
# named "", so names start at its layers: "efficientnet-b0/blocks_3/conv2d_1/kernel",
# "fpn_cells/cell_0/fnode1/resample_0_2_6/conv2d/kernel", "class_net/class-0-bn-3/gamma".

_KERAS_CONV = {"w": "kernel", "b": "bias"}
_KERAS_BN = {"scale": "gamma", "offset": "beta", "mean": "moving_mean", "var": "moving_variance"}
# Our separable conv's two halves: one Keras SeparableConv2D layer.
_KERAS_SEPARABLE = {"conv_dw": {"w": "depthwise_kernel"},
                    "conv_pw": {"w": "pointwise_kernel", "b": "bias"}}
# Inside an official MBConv block, Keras numbers repeated layer names per block: conv2d,
# conv2d_1 and tpu_batch_normalization, _1, _2 in creation order (expansion, depthwise,
# projection); the stage-1 blocks (no expansion) start at the depthwise BN.
_BLOCK_LAYERS = {  # ours -> (with an expansion conv, without)
    "expand_conv": ("conv2d", None), "expand_bn": ("tpu_batch_normalization", None),
    "dwconv": ("depthwise_conv2d", "depthwise_conv2d"),
    "bn": ("tpu_batch_normalization_1", "tpu_batch_normalization"),
    "se.reduce": ("se/conv2d", "se/conv2d"), "se.expand": ("se/conv2d_1", "se/conv2d_1"),
    "project_conv": ("conv2d_1", "conv2d"),
    "project_bn": ("tpu_batch_normalization_2", "tpu_batch_normalization_1")}


def _leaves(layer: str, leaves: Mapping[str, str]) -> dict[str, str]:
    return {ours: f"{layer}/{theirs}" for ours, theirs in leaves.items()}


def _official_backbone(path: str, config: Mapping[str, Any]) -> dict[str, str]:
    backbone = config.get("backbone", 0)
    if not isinstance(backbone, int):
        raise ValueError(f"a (width, depth) backbone {backbone} has no official name")
    root = f"efficientnet-b{backbone}"
    if path in ("stem_conv", "stem_bn"):
        layer = "conv2d" if path == "stem_conv" else "tpu_batch_normalization"
        return _leaves(f"{root}/stem/{layer}", _KERAS_CONV if path == "stem_conv" else _KERAS_BN)
    m = re.fullmatch(r"block(\d+)([a-z])\.(.+)", path)
    if not m or m[3] not in _BLOCK_LAYERS:
        raise ValueError(f"no official name for backbone.{path}")
    stage, depth = int(m[1]) - 1, efficientnet.SCALING[backbone][1]
    # The official blocks are numbered blocks_0, blocks_1, ... across all stages.
    index = sum(efficientnet.round_repeats(s[1], depth) for s in efficientnet.B0_STAGES[:stage])
    index += ord(m[2]) - ord("a")
    layer = _BLOCK_LAYERS[m[3]][0 if efficientnet.B0_STAGES[stage][4] != 1 else 1]
    leaves = (_KERAS_BN if "batch_normalization" in layer
              else {"w": "depthwise_kernel"} if layer == "depthwise_conv2d" else _KERAS_CONV)
    return _leaves(f"{root}/blocks_{index}/{layer}", leaves)


def official_name(path: str, config: Mapping[str, Any]) -> dict[str, str | list[str]]:
    """Our dotted module path -> {our leaf: the official Keras model's variable name}; the
    fusion weights (one vector of ours) map to the official per-input scalars [WSM, WSM_1, ...].
    `nets.convert.from_efficientdet_official` / `to_efficientdet_official` use it."""
    if path.startswith("backbone."):
        return _official_backbone(path.removeprefix("backbone."), config)
    min_level, max_level = config.get("min_level", 3), config.get("max_level", 7)
    m = re.fullmatch(r"fpn\.resample_p(\d+)\.(conv|bn)", path)
    if m:  # P6 from C5 (P7, P8 are max-pools without parameters)
        return _leaves(f"resample_p{m[1]}/{'conv2d' if m[2] == 'conv' else 'bn'}",
                       _KERAS_CONV if m[2] == "conv" else _KERAS_BN)
    m = re.fullmatch(r"fpn\.cell_(\d+)\.node_(\d+)(.*)", path)
    if m:
        k, rest = int(m[2]), m[3]
        _, inputs = bifpn.node_graph(min_level, max_level)[k]
        node = f"fpn_cells/cell_{m[1]}/fnode{k}"
        # The official layers are named after the number of maps when the node is built: the
        # cell's inputs (one per level) plus the nodes before it.
        built = max_level - min_level + 1 + k
        if rest == "":  # the fusion weights: one scalar variable per input
            return {"fusion_weights": [f"{node}/WSM" + (f"_{i}" if i else "")
                                       for i in range(len(inputs))]}
        r = re.fullmatch(r"\.resample_(\d+)\.(conv|bn)", rest)
        if r:  # ours are keyed by input id, theirs by position, input id and `built`
            layer = f"{node}/resample_{inputs.index(int(r[1]))}_{r[1]}_{built}"
            return _leaves(f"{layer}/{'conv2d' if r[2] == 'conv' else 'bn'}",
                           _KERAS_CONV if r[2] == "conv" else _KERAS_BN)
        if rest == ".bn":
            return _leaves(f"{node}/op_after_combine{built}/bn", _KERAS_BN)
        r = re.fullmatch(r"\.conv\.(conv_dw|conv_pw)", rest)
        if r:
            return _leaves(f"{node}/op_after_combine{built}/conv", _KERAS_SEPARABLE[r[1]])
    m = re.fullmatch(r"(class|box)_net\.(?:conv_rep_(\d+)\.(conv_\w+)|bn_rep_(\d+)_(\d+)"
                     r"|predict\.(conv_\w+))", path)
    if m:
        net, kind = f"{m[1]}_net", m[1]
        if m[4] is not None:  # a BN per (repeat, level), named with the level itself
            return _leaves(f"{net}/{kind}-{m[4]}-bn-{min_level + int(m[5])}", _KERAS_BN)
        sep, part = (f"{kind}-{m[2]}", m[3]) if m[2] is not None else (f"{kind}-predict", m[6])
        if part in _KERAS_SEPARABLE:
            return _leaves(f"{net}/{sep}", _KERAS_SEPARABLE[part])
    raise ValueError(f"no official EfficientDet name for {path!r}")


# ----------------------------------------------------------------------------------------------
# Variants: the official `efficientdet_model_param_dict` (../shared/reference/efficientdet_spec.md
# §1): (backbone, input px, BiFPN width, cells, head repeats, anchor scale, max level, fusion).
# Parameter counts (90 classes) and BN statistic elements: effdet's `tf_efficientdet_*`, equal
# to the official model's (tests/reference/efficientdet_official.json).

ROWS = {"d0": (0, 512, 64, 3, 3, 4.0, 7, "fastattn", 3880067, 47136),
        "d1": (1, 640, 88, 4, 3, 4.0, 7, "fastattn", 6625898, 71456),
        "d2": (2, 768, 112, 5, 3, 4.0, 7, "fastattn", 8097039, 81776),
        "d3": (3, 896, 160, 6, 4, 4.0, 7, "fastattn", 12032296, 114304),
        "d4": (4, 1024, 224, 7, 4, 4.0, 7, "fastattn", 20723675, 167312),
        "d5": (5, 1280, 288, 7, 4, 4.0, 7, "fastattn", 33653315, 227392),
        "d6": (6, 1280, 384, 8, 5, 4.0, 7, "sum", 51871782, 311984),
        "d7": (6, 1536, 384, 8, 5, 5.0, 7, "sum", 51871782, 311984),
        "d7x": (7, 1536, 384, 8, 5, 4.0, 8, "sum", 77147166, 417728)}
NUM_SCALES = 3
# effdet's (w, h) multipliers, the official code's first-release convention; the current
# official code writes aspect ratios 1, 2, 0.5 as (sqrt(r), 1 / sqrt(r)) pairs.
ASPECT_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))


def _variant(key: str) -> ModelInfo:
    (backbone, size, width, cells, repeats, anchor_scale, max_level, fusion, params,
     bn_stats) = ROWS[key]
    return ModelInfo(
        name=f"efficientdet_{key}", family="efficientdet", builder=EfficientDet,
        config=dict(backbone=backbone, fpn_width=width, fpn_cells=cells, head_repeats=repeats,
                    max_level=max_level, fusion=fusion,
                    # the official code turns drop connect off for B0 inside EfficientDet
                    drop_connect_rate=0.0 if backbone == 0 else 0.2,
                    num_anchors=NUM_SCALES * len(ASPECT_RATIOS)),
        reference=f"effdet:tf_efficientdet_{key}", reference_params=params,
        reference_bn_stat_elems=bn_stats, train_size=size, test_size=size,
        # evaluated on the whole image, resized to fit and padded at the bottom/right
        preprocessing=Preprocessing(crop_fraction=None, image_ops="tf"),
        feature_strides=tuple(2 ** level for level in range(3, max_level + 1)),
        classifier="class_net/predict/conv_pw", task="detection",
        task_metadata=dict(image_size=size, min_level=3, max_level=max_level,
                           anchor_scale=anchor_scale, num_scales=NUM_SCALES,
                           aspect_ratios=ASPECT_RATIOS, num_classes=90),
        torch_name=torch_name, official_name=official_name,
        backbone=f"efficientnet_b{backbone}")


def _keypoint_variant() -> ModelInfo:
    """D0 with the point head (issue 20, efficientdet_spec.md §18): one point slot per cell on
    P3, the stride-8 grid (the design note's one grid size, fixed in advance). No reference
    implementation exists, so no reference count; tests/test_keypoints.py counts the head in
    closed form. One point class by default (pass num_classes for more)."""
    info = _variant("d0")
    config = {k: v for k, v in info.config.items() if k != "num_anchors"}
    return dataclasses.replace(
        info, name="efficientdet_d0_keypoints", config={**config, "points_per_cell": 1},
        reference="paper:EfficientDet D0 + the design notes' point head (spec §18)",
        reference_params=None, reference_bn_stat_elems=None, task="keypoints",
        task_metadata=dict(image_size=512, min_level=3, max_level=7, levels=(3,),
                           points_per_cell=1, num_classes=1),
        torch_name=None, official_name=None)


VARIANTS = (*(_variant(k) for k in ROWS), _keypoint_variant())
