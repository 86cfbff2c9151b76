"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018).

V2 is torchvision's `shufflenetv2`; module names mirror it (`stage2_0/branch2_3` is
`stage2.0.branch2.3`), so converting its weights is a renaming (`v2_torch_name`).

V1 is the paper's Table 1 network, with the choices the paper leaves open taken from the
authors' code (megvii-model/ShuffleNet-Series, ShuffleNetV1/): the unit is 1x1 conv (grouped,
except in the first unit of stage 2) + BN + ReLU, 3x3 depthwise conv + BN, channel shuffle,
1x1 grouped conv + BN; a stride-1 unit adds its input, then ReLU; a stride-2 unit concatenates
a 3x3 stride-2 average pool of its input (padding 1, zeros counted) with the ReLU of its
branch, which outputs (out - in) channels. Bottleneck width is out // 4. The classifier has no
bias. `v1_torch_name` maps to that code's module names, so its checkpoints convert.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.records import ModelInfo, Preprocessing


def _bn(opts, name):
    return layers.BatchNorm(opts["bn_decay"], opts["bn_eps"], name=name)


def _check_counts(counts: Sequence[int], expected: int, what: str):
    if len(counts) != expected or any(int(c) != c or c <= 0 for c in counts):
        raise ValueError(f"{what} must be {expected} positive ints, got {tuple(counts)!r}")


# ----------------------------------------------------------------------------------------------
# ShuffleNet V2


class _V2Unit(hk.Module):
    """torchvision's InvertedResidual: stride 1 splits the channels in half and transforms one
    half (branch2); stride 2 transforms the whole input in two branches. Then shuffle by 2."""

    def __init__(self, out_channels: int, stride: int, opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.out_channels, self.stride, self.opts = out_channels, stride, opts

    def __call__(self, x, is_training):
        half, c_in = self.out_channels // 2, x.shape[-1]
        if self.stride == 1:
            if c_in != 2 * half:
                raise ValueError(f"{self.module_name}: a stride-1 unit needs {2 * half} input "
                                 f"channels, got {c_in}")
            keep, x = jnp.split(x, 2, axis=-1)
        else:
            keep = layers.Conv(c_in, 3, self.stride, groups=c_in, name="branch1_0")(x)
            keep = _bn(self.opts, "branch1_1")(keep, is_training)
            keep = layers.Conv(half, 1, name="branch1_2")(keep)
            keep = jax.nn.relu(_bn(self.opts, "branch1_3")(keep, is_training))
        y = layers.Conv(half, 1, name="branch2_0")(x)
        y = jax.nn.relu(_bn(self.opts, "branch2_1")(y, is_training))
        y = layers.Conv(half, 3, self.stride, groups=half, name="branch2_3")(y)
        y = _bn(self.opts, "branch2_4")(y, is_training)
        y = layers.Conv(half, 1, name="branch2_5")(y)
        y = jax.nn.relu(_bn(self.opts, "branch2_6")(y, is_training))
        return layers.channel_shuffle(jnp.concatenate([keep, y], axis=-1), 2)


class ShuffleNetV2(hk.Module):
    """ShuffleNet V2 (torchvision). `__call__` gives logits (the pooled conv5 output when
    num_classes=0); `features` gives {"stage1": the stride-4 map after the max pool,
    "stage2".."stage4": the stage outputs at strides 8, 16, 32 (before conv5)}.

    Args:
      stages_repeats: units in stages 2, 3, 4 (the first of each has stride 2).
      stages_out_channels: stem width, the widths of stages 2-4, and conv5's width.
      bn_decay, bn_eps: BatchNorm running-average decay (PyTorch momentum 0.1 = decay 0.9) and eps.
    """

    def __init__(self, stages_repeats: Sequence[int] = (4, 8, 4),
                 stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024),
                 num_classes: int = 1000, in_channels: int = 3, bn_decay: float = 0.9,
                 bn_eps: float = 1e-5, name: str = "shufflenet_v2"):
        super().__init__(name=name)
        _check_counts(stages_repeats, 3, "stages_repeats")
        _check_counts(stages_out_channels, 5, "stages_out_channels")
        self.stages_repeats = tuple(stages_repeats)
        self.stages_out_channels = tuple(stages_out_channels)
        self.num_classes, self.in_channels = num_classes, in_channels
        self.opts = dict(bn_decay=bn_decay, bn_eps=bn_eps)

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        x = layers.Conv(self.stages_out_channels[0], 3, 2, name="conv1_0")(images)
        x = jax.nn.relu(_bn(self.opts, "conv1_1")(x, is_training))
        maps = {"stage1": layers.max_pool(x, 3, 2, padding=1)}
        x = maps["stage1"]
        for s, (repeats, width) in enumerate(zip(self.stages_repeats,
                                                 self.stages_out_channels[1:4]), start=2):
            for i in range(repeats):
                x = _V2Unit(width, 2 if i == 0 else 1, self.opts, name=f"stage{s}_{i}")(
                    x, is_training)
            maps[f"stage{s}"] = x
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)["stage4"]
        x = layers.Conv(self.stages_out_channels[4], 1, name="conv5_0")(x)
        x = jax.nn.relu(_bn(self.opts, "conv5_1")(x, is_training))
        return layers.classifier(x, self.num_classes, is_training)


def v2_torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path -> torchvision's: "stage2_0.branch2_3" -> "stage2.0.branch2.3"."""
    del config
    return ".".join(re.sub(r"^(\w+?)_(\d+)$", r"\1.\2", part) for part in path.split("."))


# ----------------------------------------------------------------------------------------------
# ShuffleNet V1

# Paper, Table 1: output channels of stages 2-4 at 1x, per number of groups.
V1_STAGE_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                     4: (272, 544, 1088), 8: (384, 768, 1536)}
# Stem widths: the authors' code's for the scales it defines (0.5x, 1x, 1.5x, 2x); at 0.25x,
# the width that gives the paper's 13 MFLOPs (Table 2): a 12-wide stem gives 13.3M at g=3, a
# 6-wide one (24 * 0.25) 11.0M.
_V1_STEM = {0.25: 12, 0.5: 12, 1.0: 24, 1.5: 24, 2.0: 48}


def v1_channels(groups: int, width_multiplier: float = 1.0,
                stem_channels: int | None = None) -> tuple[int, int, int, int]:
    """(stem, stage2, stage3, stage4) widths of "ShuffleNet s x" with g groups.

    Stage widths are int(Table 1 width * s). The stem is 12 at 0.25x and 0.5x, 24 at 1x and
    1.5x, 48 at 2x (`_V1_STEM`), else round(24 * s); then raised until the first unit's branch
    (stage2 - stem channels) divides into g groups: the authors' 16 for g=8 at 0.5x.
    """
    if groups not in V1_STAGE_CHANNELS:
        raise ValueError(f"groups must be one of {sorted(V1_STAGE_CHANNELS)} (the paper's "
                         f"Table 1), got {groups!r}")
    stages = tuple(int(c * width_multiplier) for c in V1_STAGE_CHANNELS[groups])
    if stem_channels is None:
        stem_channels = _V1_STEM.get(width_multiplier, round(24 * width_multiplier))
        while stem_channels < stages[0] and (stages[0] - stem_channels) % groups:
            stem_channels += 1
    return (stem_channels, *stages)


def v1_shuffle(x, groups: int):
    """The authors' code's shuffle: NCHW reshape (C / g, g), permute, flatten; output channel
    j * (C / g) + i reads input channel i * g + j. This is the inverse of the paper's (g, C / g)
    transpose (`layers.channel_shuffle(x, g)`); either gives every group of the next grouped
    conv C / g^2 channels from each group of the previous one."""
    return layers.channel_shuffle(x, x.shape[-1] // groups)


class _V1Unit(hk.Module):
    def __init__(self, out_channels: int, stride: int, groups: int, first_groups: int,
                 opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.out_channels, self.stride = out_channels, stride
        self.groups, self.first_groups, self.opts = groups, first_groups, opts

    def __call__(self, x, is_training):
        c_in, mid = x.shape[-1], self.out_channels // 4
        if self.stride == 1 and c_in != self.out_channels:
            raise ValueError(f"{self.module_name}: a stride-1 unit needs {self.out_channels} "
                             f"input channels, got {c_in}")
        branch_out = self.out_channels - c_in if self.stride == 2 else self.out_channels
        y = layers.Conv(mid, 1, groups=self.first_groups, name="conv1")(x)
        y = jax.nn.relu(_bn(self.opts, "bn1")(y, is_training))
        y = layers.Conv(mid, 3, self.stride, groups=mid, name="conv2")(y)
        y = _bn(self.opts, "bn2")(y, is_training)
        # After the depthwise conv and its BN, as in the authors' code: both act per channel,
        # so this is the paper's unit with the depthwise weights permuted.
        if self.groups > 1:
            y = v1_shuffle(y, self.groups)
        y = layers.Conv(branch_out, 1, groups=self.groups, name="conv3")(y)
        y = _bn(self.opts, "bn3")(y, is_training)
        if self.stride == 1:
            return jax.nn.relu(y + x)
        # The pooled input is a ReLU output already, so only the branch needs the ReLU.
        return jnp.concatenate([layers.avg_pool(x, 3, 2, padding=1), jax.nn.relu(y)], axis=-1)


class ShuffleNetV1(hk.Module):
    """ShuffleNet V1 ("ShuffleNet s x", g groups). `__call__` gives logits (the pooled stage-4
    output when num_classes=0); `features` gives {"stage1": the stride-4 map after the max
    pool, "stage2".."stage4": the stage outputs at strides 8, 16, 32}.

    Args:
      groups: g of the grouped 1x1 convs: 1, 2, 3, 4 or 8.
      width_multiplier: s, scaling every width (see `v1_channels` for the stem).
      stem_channels: overrides the stem width.
      stages_repeats: units in stages 2, 3, 4 (the first of each has stride 2).
      bn_decay, bn_eps: BatchNorm running-average decay (PyTorch momentum 0.1 = decay 0.9) and eps.
    """

    def __init__(self, groups: int = 3, width_multiplier: float = 1.0,
                 stem_channels: int | None = None, stages_repeats: Sequence[int] = (4, 8, 4),
                 num_classes: int = 1000, in_channels: int = 3, bn_decay: float = 0.9,
                 bn_eps: float = 1e-5, name: str = "shufflenet_v1"):
        super().__init__(name=name)
        _check_counts(stages_repeats, 3, "stages_repeats")
        self.channels = v1_channels(groups, width_multiplier, stem_channels)
        stem, *stages = self.channels
        for c_in, c_out in zip([stem, *stages[:-1]], stages):
            if (c_out // 4) % groups or (c_out - c_in) % groups:
                raise ValueError(
                    f"ShuffleNet V1 {width_multiplier}x with g={groups}: widths {self.channels} "
                    f"give bottleneck {c_out // 4} and first-unit branch {c_out - c_in}, which "
                    f"must divide into {groups} groups")
        self.groups, self.stages_repeats = groups, tuple(stages_repeats)
        self.num_classes, self.in_channels = num_classes, in_channels
        self.opts = dict(bn_decay=bn_decay, bn_eps=bn_eps)

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        x = layers.Conv(self.channels[0], 3, 2, name="stem_conv")(images)
        x = jax.nn.relu(_bn(self.opts, "stem_bn")(x, is_training))
        maps = {"stage1": layers.max_pool(x, 3, 2, padding=1)}
        x = maps["stage1"]
        for s, (repeats, width) in enumerate(zip(self.stages_repeats, self.channels[1:]),
                                             start=2):
            for i in range(repeats):
                # Stage 2's first unit has too few input channels to group its first conv.
                first_groups = 1 if s == 2 and i == 0 else self.groups
                x = _V1Unit(width, 2 if i == 0 else 1, self.groups, first_groups, self.opts,
                            name=f"stage{s}_{i}")(x, is_training)
            maps[f"stage{s}"] = x
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)["stage4"]
        # Logits in float32 whatever the compute dtype.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes:
            x = layers.Linear(self.num_classes, with_bias=False, name="fc")(x)
        return x


_V1_NAMES = {"stem_conv": "first_conv.0", "stem_bn": "first_conv.1", "fc": "classifier.0",
             "conv1": "branch_main_1.0", "bn1": "branch_main_1.1", "conv2": "branch_main_1.3",
             "bn2": "branch_main_1.4", "conv3": "branch_main_2.0", "bn3": "branch_main_2.1"}


def v1_torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path -> the authors' code's (one `features` sequence of all units):
    "stage3_1.conv2" -> "features.5.branch_main_1.3" with repeats (4, 8, 4)."""
    repeats = tuple(config.get("stages_repeats", (4, 8, 4)))
    parts = []
    for part in path.split("."):
        m = re.fullmatch(r"stage(\d)_(\d+)", part)
        parts.append(f"features.{sum(repeats[:int(m[1]) - 2]) + int(m[2])}" if m
                     else _V1_NAMES.get(part, part))
    return ".".join(parts)


# ----------------------------------------------------------------------------------------------
# Registered variants. V2 counts: ../shared/reference/params.json (with head, without, BN stats).

# torchvision evaluates x1_5 and x2_0 at resize 232, crop 224 (their weights' transforms).
_CROP_232 = Preprocessing(crop_fraction=224 / 232)
_DEFAULT = Preprocessing()


def _v2(width: str, channels, counts, preprocessing=_DEFAULT) -> ModelInfo:
    name = f"shufflenet_v2_{width}"
    with_head, no_head, bn_stats = counts
    return ModelInfo(name=name, family="shufflenet", builder=ShuffleNetV2,
                     config=dict(stages_repeats=(4, 8, 4), stages_out_channels=channels),
                     reference=f"torchvision:{name}", reference_params=with_head,
                     reference_params_no_head=no_head, reference_bn_stat_elems=bn_stats,
                     preprocessing=preprocessing, torch_name=v2_torch_name)


def _v1(groups: int, scale: float = 1.0) -> ModelInfo:
    suffix = "" if scale == 1 else "_x" + str(float(scale)).replace(".", "_")
    config = dict(groups=groups) if scale == 1 else dict(groups=groups, width_multiplier=scale)
    return ModelInfo(name=f"shufflenet_v1_g{groups}{suffix}", family="shufflenet",
                     builder=ShuffleNetV1, config=config,
                     reference="paper:ShuffleNet V1 (Zhang et al. 2018), Table 1",
                     torch_name=v1_torch_name)


VARIANTS = (
    _v2("x0_5", (24, 48, 96, 192, 1024), (1366792, 341792, 7952)),
    _v2("x1_0", (24, 116, 232, 464, 1024), (2278604, 1253604, 16180)),
    _v2("x1_5", (24, 176, 352, 704, 1024), (3503624, 2478624, 23440), _CROP_232),
    _v2("x2_0", (24, 244, 488, 976, 2048), (7393996, 5344996, 33716), _CROP_232),
    # 1x for every g of Table 1; the scales the authors released (g=3, 8: 0.5x, 1.5x, 2x) and
    # the paper's smallest, 0.25x (Table 2). Other (g, s) pairs give widths that do not divide
    # into g groups under the int(width * s) rule (e.g. g=4 0.5x: bottleneck 34).
    *(_v1(g) for g in (1, 2, 3, 4, 8)),
    *(_v1(g, s) for g in (3, 8) for s in (0.5, 1.5, 2.0)),
    _v1(3, 0.25),
)
