"""The ResNet family as one stage/block system.

ResNet (He et al. 2016, torchvision's "v1.5": stride on the 3x3 conv), ResNeXt (cardinality =
`groups`, bottleneck width = `width_per_group`), Wide ResNet (`width_per_group=128`),
SE-ResNe(X)t (`attention="se"`), ResNet-D (`stem="deep"`, `avg_down=True`), dilated stages
(`replace_stride_with_dilation`) and stochastic depth are options of one module, and so are the
blocks' variations: ResNeSt's split-attention 3x3 (`radix`, `avd`), SKNet's selective-kernel 3x3
(`selective_kernel`), deformable 3x3s (`deformable_stages`), and CBAM / GCNet attention
(`attention="cbam"`, `"gc"`, in `attention_stages`). The registered variants at the bottom are
rows of data.

ResNeSt and the design notes disagree on radix 1: the notes call radix 1 plain ResNet/ResNeXt,
the reference (timm, the official code) keeps the attention with a sigmoid gate for one split
(resnest50d_1s4x24d). Here radix 1 is the plain 3x3 and `split_attention=True` keeps the
attention, so both read as written.

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

from nets import attention, deformable, layers
from nets.records import ModelInfo, Preprocessing

STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}
ATTENTION = (None, "se", "cbam", "gc")


class _Block(hk.Module):
    """What both block kinds share: the shortcut, the attention module and the tail (drop path,
    add, ReLU)."""

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
                                self.opts["unbiased_running_var"], zero_init=zero_init,
                                name=name)

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
        x = layers.Conv(out_channels, 1, stride, with_bias=self.opts["conv_bias"],
                        name="downsample_conv")(x)
        return self.bn("downsample_bn")(x, is_training)

    @hk.name_like("__call__")
    def attend(self, x, is_training):
        """The block's attention module on x (identity when the stage has none)."""
        opts = self.opts
        kind, c = opts["attention"], x.shape[-1]
        if kind == "se":
            reduced = layers.make_divisible(c * opts["attention_ratio"], 8, round_limit=0.0)
            return layers.SqueezeExcite(reduced, with_bias=opts["se_bias"], name="se")(x)
        reduced = layers.make_divisible(c * opts["attention_ratio"], 1, round_limit=0.0)
        if kind == "cbam":
            return attention.Cbam(reduced, bn_decay=opts["bn_decay"], bn_eps=opts["bn_eps"],
                                  name="cbam")(x, is_training)
        if kind == "gc":
            return attention.GlobalContext(reduced, opts["gc_fusion"], opts["gc_layer_norm_eps"],
                                           name="gc")(x)
        return x

    @hk.name_like("__call__")
    def finish(self, out, x, is_training):
        if self.opts["attention_position"] == "last":
            out = self.attend(out, is_training)
        out = layers.stochastic_depth(out, self.stochastic_depth_rate, is_training,
                                      self.opts["stochastic_depth_scale_at"])
        return jax.nn.relu(out + self.shortcut(x, out.shape[-1], is_training))

    @hk.name_like("__call__")
    def selective_kernel(self, x, width, stride, groups, is_training, name):
        opts = self.opts
        attn = layers.make_divisible(width * opts["sk_ratio"], opts["sk_min_width"])
        return attention.SelectiveKernelConv(
            width, attn, opts["sk_kernels"], stride, self.first_dilation, groups,
            opts["sk_split_input"], opts["bn_decay"], opts["bn_eps"], name=name)(x, is_training)


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34); the first a selective-kernel conv in SK-ResNets."""

    def __call__(self, x, is_training):
        opts = self.opts
        if opts["groups"] != 1 or opts["width_per_group"] != 64:
            raise ValueError("the basic block supports only groups=1 and width_per_group=64")
        if opts["radix"] > 1 or opts["split_attention"] or opts["deformable"]:
            raise ValueError("split attention and deformable convs need the bottleneck block")
        if opts["stride_in_1x1"]:
            raise ValueError("stride_in_1x1 needs the bottleneck block (the basic block has "
                             "no 1x1 conv)")
        bias = opts["conv_bias"]
        if opts["selective_kernel"]:
            out = self.selective_kernel(x, self.planes, self.stride, 1, is_training, "conv1")
        else:
            out = layers.Conv(self.planes, 3, self.stride, dilation=self.first_dilation,
                              with_bias=bias, name="conv1")(x)
            out = jax.nn.relu(self.bn("bn1")(out, is_training))
        if opts["attention_position"] == "mid":
            out = self.attend(out, is_training)
        out = layers.Conv(self.planes, 3, dilation=self.dilation, with_bias=bias,
                          name="conv2")(out)
        out = self.bn("bn2", opts["zero_init_residual"])(out, is_training)
        return self.finish(out, x, is_training)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (grouped for ResNeXt, strided), 1x1 expand by 4. The 3x3 is a
    split-attention conv (ResNeSt), a selective-kernel conv (SKNet) or a deformable conv as
    configured; with `avd` a 3x3 average pool takes over its stride (ResNeSt), with
    `stride_in_1x1` the first 1x1 conv (the original ResNet's, Keras')."""

    def __call__(self, x, is_training):
        opts = self.opts
        groups = opts["groups"]
        width = int(self.planes * opts["width_per_group"] / 64) * groups
        bias = opts["conv_bias"]
        reduce_stride, stride = (self.stride, 1) if opts["stride_in_1x1"] else (1, self.stride)
        pool_stride = 1
        out = layers.Conv(width, 1, reduce_stride, with_bias=bias, name="conv1")(x)
        out = jax.nn.relu(self.bn("bn1")(out, is_training))
        if opts["avd"] and stride > 1:
            stride, pool_stride = 1, stride
        if pool_stride > 1 and opts["avd_first"]:
            out = layers.avg_pool(out, 3, pool_stride, padding=1)
        if opts["radix"] > 1 or opts["split_attention"]:
            out = attention.SplitAttentionConv(
                width, 3, stride, self.first_dilation, groups, opts["radix"], opts["bn_decay"],
                opts["bn_eps"], name="conv2")(out, is_training)
        elif opts["selective_kernel"]:
            out = self.selective_kernel(out, width, stride, groups, is_training, "conv2")
        else:
            if opts["deformable"]:
                conv = deformable.DeformableConv(width, 3, stride, dilation=self.first_dilation,
                                                 groups=groups, name="conv2")
            else:
                conv = layers.Conv(width, 3, stride, dilation=self.first_dilation,
                                   groups=groups, with_bias=bias, name="conv2")
            out = jax.nn.relu(self.bn("bn2")(conv(out), is_training))
        if pool_stride > 1 and not opts["avd_first"]:
            out = layers.avg_pool(out, 3, pool_stride, padding=1)
        if opts["attention_position"] == "mid":
            out = self.attend(out, is_training)
        out = layers.Conv(self.planes * 4, 1, with_bias=bias, name="conv3")(out)
        out = self.bn("bn3", opts["zero_init_residual"])(out, is_training)
        return self.finish(out, x, is_training)


class ResNet(hk.Module):
    """ResNet-family network. `__call__` gives logits (pooled features when num_classes=0);
    `features` gives the four stage outputs {"stage1": stride 4, ..., "stage4": stride 32}.

    Args:
      layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: "basic" or "bottleneck".
      groups, width_per_group: ResNeXt cardinality and bottleneck width per group
        (the 3x3 width of stage s is int(planes_s * width_per_group / 64) * groups).
      stem: "7x7" (one 7x7 stride-2 conv, max pool), "deep" (three 3x3 convs stem_width,
        stem_width, 2 * stem_width wide, max pool: ResNet-C/D) or "tiered" (three 3x3 convs
        3/4, 1, 2 x stem_width wide, the last strided, no pool: timm's ResNet-T).
      avg_down: shortcut downsampling by 2x2 average pooling then a 1x1 conv (ResNet-D).
      attention: None, "se" (squeeze-excitation, FC biases when se_bias, width
        make_divisible(C * attention_ratio, 8)), "cbam" (CBAM, MLP width C * attention_ratio)
        or "gc" (GCNet's global context block, width C * attention_ratio, gc_fusion "add" or
        "scale", LayerNorm eps gc_layer_norm_eps); in the blocks of `attention_stages`
        (1-based), after the block's last BN (attention_position "last", the papers' place) or
        after its 3x3 conv ("mid", timm's ByobNet).
      radix, split_attention: ResNeSt. Radix r > 1 makes the 3x3 a split-attention conv with r
        splits per cardinal group; with radix 1 the 3x3 stays a plain conv (radix 1 and
        groups 1 is ResNet, groups > 1 ResNeXt) unless split_attention=True, which keeps the
        attention with one split (a sigmoid gate per group, as the reference's "1s" models).
        avd: the stride of a downsampling block moves from the 3x3 conv to a 3x3 average pool
        after it (or before it with avd_first).
      selective_kernel: SKNet. The 3x3 (the first conv of a basic block) becomes a
        selective-kernel conv with one path per size in sk_kernels, fuse width
        make_divisible(C * sk_ratio, sk_min_width) (the paper's max(C / r, L) with L =
        sk_min_width), inputs split across paths when sk_split_input.
      deformable_stages: stages (1-based) whose 3x3 convs are deformable (DCNv2, modulated).
      zero_init_residual: initialise each block's last BN scale to zero.
      replace_stride_with_dilation: per stage 2-4, replace its stride by dilation
        (torchvision's option: (False, False, True) gives output stride 16, (False, True, True) 8).
      stochastic_depth_rate: drop rate of the last block; stochastic_depth_decay "linear" gives
        block l of L (1-based) the rate l / L * rate (Huang et al. 2016), "uniform" gives every
        block the rate; stochastic_depth_scale_at: see layers.stochastic_depth.
      bn_decay, bn_eps: BatchNorm running-average decay (PyTorch momentum 0.1 = decay 0.9) and eps.
      unbiased_running_var: the running variance averages the unbiased batch variance (PyTorch)
        or the biased one (Keras).
      stride_in_1x1: a downsampling bottleneck strides its first 1x1 conv, not the 3x3 (the
        original ResNet's "v1", Keras' and Caffe's; torchvision's "v1.5" strides the 3x3).
      conv_bias: the stem's, the blocks' and the shortcuts' convs have biases (Keras' ResNet;
        plain 3x3s only, as stride_in_1x1: not with split-attention, selective-kernel,
        deformable convs or avd).
      channel_order: the channel order the stem's weights read: "bgr" (Keras' and Caffe's
        ResNets) reverses the channels of the (RGB, normalised) images first.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), block: str = "bottleneck",
                 num_classes: int = 1000, groups: int = 1, width_per_group: int = 64,
                 stem: str = "7x7", stem_width: int = 64, avg_down: bool = False,
                 attention: str | None = None, attention_ratio: float = 1 / 16,
                 attention_stages: Sequence[int] = (1, 2, 3, 4),
                 attention_position: str = "last", se_bias: bool = True,
                 gc_fusion: str = "add", gc_layer_norm_eps: float = 1e-5,
                 radix: int = 1, split_attention: bool = False, avd: bool = False,
                 avd_first: bool = False, selective_kernel: bool = False,
                 sk_kernels: Sequence[int] = (3, 5), sk_ratio: float = 1 / 16,
                 sk_min_width: int = 8, sk_split_input: bool = True,
                 deformable_stages: Sequence[int] = (), zero_init_residual: bool = False,
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                 stochastic_depth_rate: float = 0.0, stochastic_depth_decay: str = "linear",
                 stochastic_depth_scale_at: str = "train", in_channels: int = 3,
                 bn_decay: float = 0.9, bn_eps: float = 1e-5, unbiased_running_var: bool = True,
                 stride_in_1x1: bool = False, conv_bias: bool = False,
                 channel_order: str = "rgb", name: str = "resnet"):
        super().__init__(name=name)
        choices = dict(block=(block, tuple(EXPANSION)), stem=(stem, ("7x7", "deep", "tiered")),
                       attention=(attention, ATTENTION),
                       attention_position=(attention_position, ("last", "mid")),
                       channel_order=(channel_order, ("rgb", "bgr")),
                       stochastic_depth_decay=(stochastic_depth_decay, ("linear", "uniform")))
        for option, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{option} must be one of {allowed}, got {value!r}")
        for option, stages in dict(attention_stages=attention_stages,
                                   deformable_stages=deformable_stages).items():
            if not set(stages) <= {1, 2, 3, 4}:
                raise ValueError(f"{option} are 1-based stage numbers (1-4), got {stages!r}")
        if radix < 1:
            raise ValueError(f"radix must be >= 1, got {radix}")
        kinds = [k for k, on in (("selective-kernel", selective_kernel),
                                 ("split-attention", radix > 1 or split_attention),
                                 ("deformable", bool(deformable_stages))) if on]
        if len(kinds) > 1:
            raise ValueError(f"the 3x3 conv can be one of selective-kernel, split-attention or "
                             f"deformable; got {' and '.join(kinds)}")
        plain = [o for o, on in (("stride_in_1x1", stride_in_1x1), ("conv_bias", conv_bias)) if on]
        if plain and (kinds or avd):
            raise ValueError(f"{' and '.join(plain)} apply to plain 3x3 convs without avd; got "
                             f"{' and '.join(kinds + ['avd'] * avd)}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation needs one flag for each of stages 2-4")
        self.layers, self.block = tuple(layers), block
        self.num_classes, self.in_channels = num_classes, in_channels
        self.stem, self.stem_width = stem, stem_width
        self.dilate = tuple(replace_stride_with_dilation)
        self.attention_stages, self.deformable_stages = attention_stages, deformable_stages
        self.stochastic_depth_rate = stochastic_depth_rate
        self.stochastic_depth_decay = stochastic_depth_decay
        self.opts = dict(groups=groups, width_per_group=width_per_group, avg_down=avg_down,
                         attention=attention, attention_ratio=attention_ratio,
                         attention_position=attention_position, se_bias=se_bias,
                         gc_fusion=gc_fusion, gc_layer_norm_eps=gc_layer_norm_eps,
                         radix=radix, split_attention=split_attention, avd=avd,
                         avd_first=avd_first, selective_kernel=selective_kernel,
                         sk_kernels=tuple(sk_kernels), sk_ratio=sk_ratio,
                         sk_min_width=sk_min_width, sk_split_input=sk_split_input,
                         deformable=False, zero_init_residual=zero_init_residual,
                         bn_decay=bn_decay, bn_eps=bn_eps,
                         unbiased_running_var=unbiased_running_var, stride_in_1x1=stride_in_1x1,
                         conv_bias=conv_bias, stochastic_depth_scale_at=stochastic_depth_scale_at)
        self.channel_order = channel_order

    @hk.name_like("__call__")
    def _bn(self, name):
        return layers.BatchNorm(self.opts["bn_decay"], self.opts["bn_eps"],
                                self.opts["unbiased_running_var"], name=name)

    @hk.name_like("__call__")
    def _stem(self, x, is_training):
        if self.channel_order == "bgr":
            x = x[..., ::-1]
        bias = self.opts["conv_bias"]
        if self.stem == "7x7":
            x = layers.Conv(64, 7, 2, with_bias=bias, name="conv1")(x)
            return layers.max_pool(jax.nn.relu(self._bn("bn1")(x, is_training)), 3, 2, padding=1)
        sw = self.stem_width
        widths, strides = (sw, sw, 2 * sw), (2, 1, 1)
        if self.stem == "tiered":
            widths, strides = (3 * sw // 4, sw, 2 * sw), (2, 1, 2)
        for i, (width, stride) in enumerate(zip(widths, strides), start=1):
            x = layers.Conv(width, 3, stride, with_bias=bias, name=f"stem_conv{i}")(x)
            x = jax.nn.relu(self._bn(f"stem_bn{i}" if i < 3 else "bn1")(x, is_training))
        return x if self.stem == "tiered" else layers.max_pool(x, 3, 2, padding=1)

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
            opts = {**self.opts, "deformable": s + 1 in self.deformable_stages}
            if s + 1 not in self.attention_stages:
                opts["attention"] = None
            for i in range(depth):
                x = block_cls(planes, stride if i == 0 else 1, dilation,
                              first_dilation if i == 0 else dilation, next(rates), opts,
                              name=f"layer{s + 1}_{i}")(x, is_training)
            maps[f"stage{s + 1}"] = x
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)["stage4"]
        return layers.classifier(x, self.num_classes, is_training)


# ----------------------------------------------------------------------------------------------
# Weight names of the reference implementations (torchvision and timm share them).

_DEEP_STEM = {"stem_conv1": "conv1.0", "stem_bn1": "conv1.1", "stem_conv2": "conv1.3",
              "stem_bn2": "conv1.4", "stem_conv3": "conv1.6"}
# timm's SK blocks wrap conv + BN as ConvNormAct ("conv1.conv", "conv1.bn") where the other
# blocks have "conv1" and "bn1".
_SK_CONV_NORM = {"basic": ("conv2", "bn2"), "bottleneck": ("conv1", "bn1", "conv3", "bn3")}


def _split_index(part: str) -> str:
    """"layer1_0" -> "layer1.0", "paths_1" -> "paths.1" (PyTorch's Sequential/ModuleList)."""
    return re.sub(r"_(\d+)$", r".\1", part)


def torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path (e.g. "layer1_0.downsample_conv") -> the PyTorch module name
    (torchvision's, and timm's ResNet, ResNeSt and SKNet)."""
    # timm's ResNet-D shortcut is Sequential(pool, conv, bn); the plain one Sequential(conv, bn).
    shift = 1 if config.get("avg_down") else 0
    renames = {**_DEEP_STEM, "downsample_conv": f"downsample.{shift}",
               "downsample_bn": f"downsample.{shift + 1}"}
    parts = [renames.get(p, _split_index(p)) for p in path.split(".")]
    if parts[0].startswith("layer") and len(parts) > 1:
        child = parts[1]
        if config.get("selective_kernel") and child in _SK_CONV_NORM[config.get("block",
                                                                               "bottleneck")]:
            parts[1] = f"conv{child[-1]}.{'bn' if child.startswith('bn') else 'conv'}"
        elif child in ("cbam", "gc"):  # timm keeps any block attention as `se`
            parts[1] = "se"
        if child == "cbam" and parts[2:3] == ["spatial"]:  # a ConvNormAct there too
            parts[3] = f"conv.{parts[3]}"
    return ".".join(parts)


_BYOB_BLOCK = {"conv1": "conv1_1x1.conv", "bn1": "conv1_1x1.bn", "conv2": "conv2_kxk.conv",
               "bn2": "conv2_kxk.bn", "conv3": "conv3_1x1.conv", "bn3": "conv3_1x1.bn",
               "downsample_conv": "shortcut.conv", "downsample_bn": "shortcut.bn",
               "se": "attn", "cbam": "attn", "gc": "attn"}


def byobnet_torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Module names of timm's ByobNet ResNets (gcresnet50t): "stem.conv1.conv",
    "stages.1.0.conv2_kxk.bn", "head.fc"."""
    parts = path.split(".")
    m = re.fullmatch(r"layer(\d)_(\d+)", parts[0])
    if m:
        return ".".join([f"stages.{int(m[1]) - 1}.{m[2]}", _BYOB_BLOCK[parts[1]], *parts[2:]])
    m = re.fullmatch(r"stem_(conv|bn)(\d)", parts[0])
    if m:
        return f"stem.conv{m[2]}.{m[1]}"
    return {"bn1": "stem.conv3.bn", "fc": "head.fc"}[parts[0]]


_KERAS_BLOCK = {"downsample_conv": "0_conv", "downsample_bn": "0_bn", "conv1": "1_conv",
                "bn1": "1_bn", "conv2": "2_conv", "bn2": "2_bn", "conv3": "3_conv", "bn3": "3_bn"}


def keras_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path -> keras.applications' ResNet (v1) layer name: "layer2_0.conv1"
    -> "conv3_block1_1_conv" (Keras numbers the stem's stage 1 and blocks from 1)."""
    del config
    parts = path.split(".")
    m = re.fullmatch(r"layer(\d)_(\d+)", parts[0])
    if m:
        return f"conv{int(m[1]) + 1}_block{int(m[2]) + 1}_{_KERAS_BLOCK[parts[1]]}"
    return {"conv1": "conv1_conv", "bn1": "conv1_bn", "fc": "predictions"}[parts[0]]


# ----------------------------------------------------------------------------------------------
# Registered variants. Counts: ../shared/reference/params.json (with head, without, BN stats).


def _variant(name, reference, counts, *, torch_names=torch_name, info=None,
             **config) -> ModelInfo:
    """A registered row; `info` holds further ModelInfo fields (sizes, preprocessing)."""
    with_head, no_head, bn_stats = counts or (None, None, None)
    return ModelInfo(name=name, family="resnet", builder=ResNet, config=config,
                     reference=reference, reference_params=with_head,
                     reference_params_no_head=no_head, reference_bn_stat_elems=bn_stats,
                     torch_name=torch_names, **(info or {}))


R18, R34 = dict(block="basic", layers=(2, 2, 2, 2)), dict(block="basic", layers=(3, 4, 6, 3))
R50, R101, R152 = dict(layers=(3, 4, 6, 3)), dict(layers=(3, 4, 23, 3)), dict(layers=(3, 8, 36, 3))
# timm initialises the last BN of every block to zero (zero_init_last=True).
TIMM = dict(zero_init_residual=True)
SE = dict(attention="se", **TIMM)
RESNEST = dict(stem="deep", stem_width=32, avg_down=True, radix=2, avd=True, **TIMM)
SK = dict(selective_kernel=True)  # timm's SK-ResNets keep zero_init_last=False
GC_PAPER = dict(attention="gc", attention_stages=(2, 3, 4), **TIMM)
BICUBIC = dict(preprocessing=Preprocessing(interpolation="bicubic"))
# keras.applications' ResNet50/101/152 (the original "v1": stride on the first 1x1 conv, biased
# convs; Keras' BatchNorm: momentum 0.99, eps 1.001e-5, biased running variance). Its stem
# zero-pads before the 7x7 conv and the max pool, as PyTorch pads (the pool's zeros follow a
# ReLU, so they never win). Inputs: Keras' "caffe" preprocessing, BGR pixels in [0, 255] less
# the ImageNet mean: the model reverses the channels itself, so images stay RGB, normalised by
# mean / 255 and std 1 / 255.
KERAS = dict(stride_in_1x1=True, conv_bias=True, bn_decay=0.99, bn_eps=1.001e-5,
             unbiased_running_var=False, channel_order="bgr")
KERAS_INFO = dict(keras_name=keras_name, preprocessing=Preprocessing(
    mean=(123.68 / 255, 116.779 / 255, 103.939 / 255), std=(1 / 255,) * 3))

VARIANTS = (
    _variant("resnet18", "torchvision:resnet18", (11689512, 11176512, 9600), **R18),
    _variant("resnet34", "torchvision:resnet34", (21797672, 21284672, 17024), **R34),
    _variant("resnet50", "torchvision:resnet50", (25557032, 23508032, 53120), **R50),
    _variant("resnet101", "torchvision:resnet101", (44549160, 42500160, 105344), **R101),
    _variant("resnet152", "torchvision:resnet152", (60192808, 58143808, 151424), **R152),
    *(_variant(f"keras_resnet{depth}", f"keras:ResNet{depth}", counts, torch_names=None,
               info=dict(keras_builder=f"ResNet{depth}", **KERAS_INFO), **KERAS, **blocks)
      for depth, counts, blocks in ((50, (25583592, 23534592, 53120), R50),
                                    (101, (44601832, 42552832, 105344), R101),
                                    (152, (60268520, 58219520, 151424), R152))),
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
    # ResNeSt (Zhang et al. 2020; timm's ports of the official weights): deep stem, avg-down,
    # radix 2 split attention, avg-pool downsampling in the block.
    _variant("resnest14d", "timm:resnest14d", (10611688, 8562688, 22336),
             layers=(1, 1, 1, 1), **RESNEST),
    _variant("resnest26d", "timm:resnest26d", (17069448, 15020448, 36736),
             layers=(2, 2, 2, 2), **RESNEST),
    _variant("resnest50d", "timm:resnest50d", (27483240, 25434240, 64576), **RESNEST, **R50),
    _variant("resnest50d_1s4x24d", "timm:resnest50d_1s4x24d", (25677000, 23628000, 63680),
             info=BICUBIC, **{**RESNEST, "radix": 1}, split_attention=True, avd_first=True,
             groups=4, width_per_group=24, **R50),
    _variant("resnest101e", "timm:resnest101e", (48275016, 46226016, 130112),
             info=dict(train_size=256, test_size=256), **{**RESNEST, "stem_width": 64},
             **R101),
    # SKNet (Li et al. 2019), timm's variants: SK-ResNets split the input across the two paths;
    # skresnext50_32x4d is the paper's SKNet-50 (r 16, L 32, whole input to both paths).
    _variant("skresnet18", "timm:skresnet18", (11958056, 11445056, 13952), info=BICUBIC,
             sk_ratio=1 / 8, sk_min_width=16, **SK, **R18),
    _variant("skresnet34", "timm:skresnet34", (22282376, 21769376, 25568), info=BICUBIC,
             sk_ratio=1 / 8, sk_min_width=16, **SK, **R34),
    _variant("skresnet50", "timm:skresnet50", (25803160, 23754160, 61168), info=BICUBIC,
             **SK, **R50),
    _variant("skresnext50_32x4d", "timm:skresnext50_32x4d", (27479784, 25430784, 84544),
             info=BICUBIC, groups=32, width_per_group=4, sk_min_width=32, sk_split_input=False,
             **SK, **R50),
    # CBAM (Woo et al. 2018) in every bottleneck: timm's resnet50 with
    # block_args=dict(attn_layer="cbam") (no registered timm model; the shared table builds it).
    _variant("cbam_resnet50", "timm-constructed:cbam_resnet50", (28073576, 26024576, 53152),
             attention="cbam", **TIMM, **R50),
    # GCNet (Cao et al. 2019): the paper's ResNet-50 with a GC block (ratio 1/16 or 1/4,
    # LayerNorm, fusion by addition) after the last BN of every bottleneck of stages 2-4, as the
    # authors' mmdetection code (its LayerNorm eps 1e-5).
    _variant("gcnet_resnet50", "timm-constructed:gcnet_r50_paper_r16",
             (28078773, 26029773, 53120), **GC_PAPER, **R50),
    _variant("gcnet_resnet50_r4", "timm-constructed:gcnet_r50_paper_r4",
             (35557941, 33508941, 53120), **{**GC_PAPER, "attention_ratio": 1 / 4}, **R50),
    # timm's GC-ResNet-50-T (ByobNet): tiered stem without max pool, a GC block (ratio 1/8,
    # LayerNorm eps 1e-6) after the 3x3 conv of every bottleneck.
    _variant("gcresnet50t", "timm:gcresnet50t", (25897080, 23848080, 53232),
             torch_names=byobnet_torch_name,
             info=dict(train_size=256, test_size=288,
                       preprocessing=Preprocessing(crop_fraction=1.0, interpolation="bicubic")),
             stem="tiered", stem_width=32, attention="gc", attention_ratio=1 / 8,
             attention_position="mid", gc_layer_norm_eps=1e-6, **TIMM, **R50),
)
