"""The ResNet family as one stage/block system.

ResNet (He et al. 2016, torchvision's "v1.5": stride on the 3x3 conv), ResNeXt (cardinality =
`groups`, bottleneck width = `width_per_group`), Wide ResNet (`width_per_group=128`),
SE-ResNe(X)t (`attention="se"`), ResNet-D (`stem="deep"`, `avg_down=True`), dilated stages
(`replace_stride_with_dilation`) and stochastic depth are options of one module; the registered
variants at the bottom are rows of data.

Module names mirror the reference PyTorch modules (`layer2_0/conv2` is `layer2.0.conv2`), so weight
conversion is a renaming (`torch_name`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.registry import ModelInfo

STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


class _Block(hk.Module):
    """What both block kinds share: the shortcut and the tail (attention, drop path, add, ReLU)."""

    def __init__(self, planes: int, stride: int, dilation: int, first_dilation: int,
                 stochastic_depth_rate: float, opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.planes, self.stride = planes, stride
        self.dilation, self.first_dilation = dilation, first_dilation
        self.stochastic_depth_rate = stochastic_depth_rate
        self.opts = opts

    @hk.name_like("__call__")
    def bn(self, name, zero_init=False):
        return layers.BatchNorm(self.opts["bn_decay"], self.opts["bn_eps"],
                                zero_init=zero_init, name=name)

    @hk.name_like("__call__")
    def shortcut(self, x, out_channels, is_training):
        if self.stride == 1 and x.shape[-1] == out_channels:
            return x
        if self.opts["avg_down"]:  # ResNet-D: average-pool, then a stride-1 projection
            if self.stride > 1:
                x = layers.avg_pool(x, 2, self.stride, ceil_mode=True, count_include_pad=False)
            elif self.dilation > 1:  # timm's AvgPool2dSame(2, stride=1) in dilated stages
                x = layers.avg_pool(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), 2, 1)
            stride = 1
        else:
            stride = self.stride
        x = layers.Conv(out_channels, 1, stride, name="downsample_conv")(x)
        return self.bn("downsample_bn")(x, is_training)

    @hk.name_like("__call__")
    def finish(self, out, x, is_training):
        opts = self.opts
        if opts["attention"] == "se":
            reduced = layers.make_divisible(out.shape[-1] * opts["se_ratio"], 8, round_limit=0.0)
            out = layers.SqueezeExcite(reduced, with_bias=opts["se_bias"], name="se")(out)
        elif opts["attention"] is not None:
            raise ValueError(f"unknown attention {opts['attention']!r}; known: None, 'se'")
        out = layers.stochastic_depth(out, self.stochastic_depth_rate, is_training,
                                      opts["stochastic_depth_scale_at"])
        return jax.nn.relu(out + self.shortcut(x, out.shape[-1], is_training))


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34)."""

    def __call__(self, x, is_training):
        if self.opts["groups"] != 1 or self.opts["width_per_group"] != 64:
            raise ValueError("the basic block supports only groups=1 and width_per_group=64")
        out = layers.Conv(self.planes, 3, self.stride, dilation=self.first_dilation,
                          name="conv1")(x)
        out = jax.nn.relu(self.bn("bn1")(out, is_training))
        out = layers.Conv(self.planes, 3, dilation=self.dilation, name="conv2")(out)
        out = self.bn("bn2", self.opts["zero_init_residual"])(out, is_training)
        return self.finish(out, x, is_training)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (grouped for ResNeXt, strided), 1x1 expand by 4."""

    def __call__(self, x, is_training):
        groups = self.opts["groups"]
        width = int(self.planes * self.opts["width_per_group"] / 64) * groups
        out = layers.Conv(width, 1, name="conv1")(x)
        out = jax.nn.relu(self.bn("bn1")(out, is_training))
        out = layers.Conv(width, 3, self.stride, dilation=self.first_dilation, groups=groups,
                          name="conv2")(out)
        out = jax.nn.relu(self.bn("bn2")(out, is_training))
        out = layers.Conv(self.planes * 4, 1, name="conv3")(out)
        out = self.bn("bn3", self.opts["zero_init_residual"])(out, is_training)
        return self.finish(out, x, is_training)


class ResNet(hk.Module):
    """ResNet-family network. `__call__` gives logits (pooled features when num_classes=0);
    `features` gives the four stage outputs {"stage1": stride 4, ..., "stage4": stride 32}.

    Args:
      layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: "basic" or "bottleneck".
      groups, width_per_group: ResNeXt cardinality and bottleneck width per group
        (the 3x3 width of stage s is int(planes_s * width_per_group / 64) * groups).
      stem: "7x7" (one 7x7 stride-2 conv) or "deep" (three 3x3 convs, ResNet-C/D);
        stem_width is the width of the deep stem's first two convs.
      avg_down: shortcut downsampling by 2x2 average pooling then a 1x1 conv (ResNet-D).
      attention: None or "se" (squeeze-excitation after the last BN of each block, reduced
        width make_divisible(C * se_ratio, 8), FC biases when se_bias).
      zero_init_residual: initialise each block's last BN scale to zero.
      replace_stride_with_dilation: per stage 2-4, replace its stride by dilation
        (torchvision's option: (False, False, True) gives output stride 16, (False, True, True) 8).
      stochastic_depth_rate: drop rate of the last block; stochastic_depth_decay "linear" gives
        block l of L (1-based) the rate l / L * rate (Huang et al. 2016), "uniform" gives every
        block the rate; stochastic_depth_scale_at: see layers.stochastic_depth.
      bn_decay, bn_eps: BatchNorm running-average decay (PyTorch momentum 0.1 = decay 0.9) and eps.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), block: str = "bottleneck",
                 num_classes: int = 1000, groups: int = 1, width_per_group: int = 64,
                 stem: str = "7x7", stem_width: int = 64, avg_down: bool = False,
                 attention: str | None = None, se_ratio: float = 1 / 16, se_bias: bool = True,
                 zero_init_residual: bool = False,
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                 stochastic_depth_rate: float = 0.0, stochastic_depth_decay: str = "linear",
                 stochastic_depth_scale_at: str = "train", in_channels: int = 3,
                 bn_decay: float = 0.9, bn_eps: float = 1e-5, name: str = "resnet"):
        super().__init__(name=name)
        if block not in EXPANSION:
            raise ValueError(f"block must be one of {sorted(EXPANSION)}, got {block!r}")
        if stem not in ("7x7", "deep"):
            raise ValueError(f"stem must be '7x7' or 'deep', got {stem!r}")
        if stochastic_depth_decay not in ("linear", "uniform"):
            raise ValueError("stochastic_depth_decay must be 'linear' or 'uniform', "
                             f"got {stochastic_depth_decay!r}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation needs one flag for each of stages 2-4")
        self.layers, self.block = tuple(layers), block
        self.num_classes, self.in_channels = num_classes, in_channels
        self.stem, self.stem_width = stem, stem_width
        self.dilate = tuple(replace_stride_with_dilation)
        self.stochastic_depth_rate = stochastic_depth_rate
        self.stochastic_depth_decay = stochastic_depth_decay
        self.opts = dict(groups=groups, width_per_group=width_per_group, avg_down=avg_down,
                         attention=attention, se_ratio=se_ratio, se_bias=se_bias,
                         zero_init_residual=zero_init_residual, bn_decay=bn_decay,
                         bn_eps=bn_eps, stochastic_depth_scale_at=stochastic_depth_scale_at)

    @hk.name_like("__call__")
    def _bn(self, name):
        return layers.BatchNorm(self.opts["bn_decay"], self.opts["bn_eps"], name=name)

    @hk.name_like("__call__")
    def _stem(self, x, is_training):
        if self.stem == "deep":
            for i, width in enumerate((self.stem_width, self.stem_width), start=1):
                x = layers.Conv(width, 3, 2 if i == 1 else 1, name=f"stem_conv{i}")(x)
                x = jax.nn.relu(self._bn(f"stem_bn{i}")(x, is_training))
            x = layers.Conv(64, 3, name="stem_conv3")(x)
        else:
            x = layers.Conv(64, 7, 2, name="conv1")(x)
        x = jax.nn.relu(self._bn("bn1")(x, is_training))
        return layers.max_pool(x, 3, 2, padding=1)

    def block_rates(self) -> list[float]:
        """Stochastic-depth drop rate of every block, in order."""
        total = sum(self.layers)
        if self.stochastic_depth_decay == "uniform":
            return [self.stochastic_depth_rate] * total
        return [self.stochastic_depth_rate * (i + 1) / total for i in range(total)]

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        x = self._stem(images, is_training)
        block_cls = BasicBlock if self.block == "basic" else Bottleneck
        rates = iter(self.block_rates())
        dilation, maps = 1, {}
        for s, (planes, depth) in enumerate(zip(STAGE_PLANES, self.layers)):
            stride = 1 if s == 0 else 2
            first_dilation = dilation
            if s > 0 and self.dilate[s - 1]:
                dilation, stride = dilation * stride, 1
            for i in range(depth):
                x = block_cls(planes, stride if i == 0 else 1, dilation,
                              first_dilation if i == 0 else dilation, next(rates), self.opts,
                              name=f"layer{s + 1}_{i}")(x, is_training)
            maps[f"stage{s + 1}"] = x
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)["stage4"]
        # Logits in float32 whatever the compute dtype.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes:
            x = layers.Linear(self.num_classes, name="fc")(x)
        return x


# ----------------------------------------------------------------------------------------------
# Weight names of the reference implementations (torchvision and timm share them).

_DEEP_STEM = {"stem_conv1": "conv1.0", "stem_bn1": "conv1.1", "stem_conv2": "conv1.3",
              "stem_bn2": "conv1.4", "stem_conv3": "conv1.6"}


def torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path (e.g. "layer1_0.downsample_conv") -> the PyTorch module name."""
    # timm's ResNet-D shortcut is Sequential(pool, conv, bn); the plain one Sequential(conv, bn).
    shift = 1 if config.get("avg_down") else 0
    renames = {**_DEEP_STEM, "downsample_conv": f"downsample.{shift}",
               "downsample_bn": f"downsample.{shift + 1}"}
    parts = []
    for part in path.split("."):
        m = re.fullmatch(r"layer(\d)_(\d+)", part)
        parts.append(f"layer{m[1]}.{m[2]}" if m else renames.get(part, part))
    return ".".join(parts)


# ----------------------------------------------------------------------------------------------
# Registered variants. Counts: ../shared/reference/params.json (with head, without, BN stats).


def _variant(name, reference, counts, **config) -> ModelInfo:
    with_head, no_head, bn_stats = counts or (None, None, None)
    return ModelInfo(name=name, family="resnet", builder=ResNet, config=config,
                     reference=reference, reference_params=with_head,
                     reference_params_no_head=no_head, reference_bn_stat_elems=bn_stats,
                     torch_name=torch_name)


R18, R34 = dict(block="basic", layers=(2, 2, 2, 2)), dict(block="basic", layers=(3, 4, 6, 3))
R50, R101, R152 = dict(layers=(3, 4, 6, 3)), dict(layers=(3, 4, 23, 3)), dict(layers=(3, 8, 36, 3))
# timm initialises the last BN of every block to zero (zero_init_last=True).
TIMM = dict(zero_init_residual=True)
SE = dict(attention="se", **TIMM)

VARIANTS = (
    _variant("resnet18", "torchvision:resnet18", (11689512, 11176512, 9600), **R18),
    _variant("resnet34", "torchvision:resnet34", (21797672, 21284672, 17024), **R34),
    _variant("resnet50", "torchvision:resnet50", (25557032, 23508032, 53120), **R50),
    _variant("resnet101", "torchvision:resnet101", (44549160, 42500160, 105344), **R101),
    _variant("resnet152", "torchvision:resnet152", (60192808, 58143808, 151424), **R152),
    _variant("wide_resnet50_2", "torchvision:wide_resnet50_2", (68883240, 66834240, 68224),
             width_per_group=128, **R50),
    _variant("wide_resnet101_2", "torchvision:wide_resnet101_2",
             (126886696, 124837696, 137856), width_per_group=128, **R101),
    _variant("resnext50_32x4d", "torchvision:resnext50_32x4d", (25028904, 22979904, 68224),
             groups=32, width_per_group=4, **R50),
    _variant("resnext101_32x8d", "torchvision:resnext101_32x8d", (88791336, 86742336, 202880),
             groups=32, width_per_group=8, **R101),
    _variant("resnext101_64x4d", "torchvision:resnext101_64x4d", (83455272, 81406272, 202880),
             groups=64, width_per_group=4, **R101),
    _variant("seresnet50", "timm:seresnet50", (28088024, 26039024, 53120), **SE, **R50),
    _variant("seresnext50_32x4d", "timm:seresnext50_32x4d", (27559896, 25510896, 68224),
             groups=32, width_per_group=4, **SE, **R50),
    _variant("seresnext101_32x4d", "timm:seresnext101_32x4d", (48955416, 46906416, 137856),
             groups=32, width_per_group=4, **SE, **R101),
    _variant("resnet50d", "timm:resnet50d", (25576264, 23527264, 53248),
             stem="deep", stem_width=32, avg_down=True, **TIMM, **R50),
    # ResNeXt-50 templates of (nearly) equal complexity, Xie et al. 2017, Table 2: cardinality x
    # bottleneck width 1x64d, 2x40d, 4x24d, 8x14d (32x4d is resnext50_32x4d above); the grouped
    # 3x3 of stage 1 is 64, 80, 96, 112 wide. No library reference: tests derive the counts.
    *(_variant(f"resnext50_{c}x{w}d", "paper:ResNeXt (Xie et al. 2017), Table 2", None,
               groups=c, width_per_group=w, **R50)
      for c, w in ((1, 64), (2, 40), (4, 24), (8, 14))),
)
