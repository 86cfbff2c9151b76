"""Cross Stage Partial networks: CSP-ResNet-50, CSP-ResNeXt-50 and CSP-Darknet-53.

Paper: Wang et al. 2020, "CSPNet: A New Backbone that can Enhance Learning Capability of CNN".
Reference: timm 1.0.31 `timm/models/cspnet.py` (`cspresnet50`, `cspresnext50`, `cspdarknet53`),
a port of the authors' darknet cfgs (WongKinYiu/CrossStagePartialNetworks). Module names mirror
timm's (`stages_1/blocks_0/conv2/bn` is `stages.1.blocks.0.conv2.bn`), so converting its
weights is a renaming (`torch_name`).

CSP is a stage kind around residual blocks (the ResNet family's bottleneck, or Darknet's 1x1 ->
3x3 block); the options of `CSPNet` map to the paper as follows.

- A "cross" stage (timm's CrossStage, the paper's Fig. 3(b) "CSP with transition"):
  `conv_down` (3x3, stride, grouped like the stage's blocks; absent at stride 1) -> `conv_exp`
  (1x1 to out * expand_ratio channels) -> split the channels in two halves x' and x''
  (the paper's partial ratio of 1/2); x'' runs through the blocks and a 1x1 transition
  (`conv_transition_b`), is concatenated after x' (the cross-stage part), and a second 1x1
  transition (`conv_transition`) fuses both. The paper splits the base layer directly;
  the darknet cfgs push a 1x1 conv into each path instead, and timm uses one shared 1x1
  before the split - timm decides here.
- A "dark" stage (timm's DarkStage, plain Darknet / YOLOv3): `conv_down` then the blocks.
- `block`: "bottleneck" (1x1 -> 3x3 grouped -> 1x1 without activation, + shortcut, then the
  activation; ResNe(X)t) or "dark" (1x1 -> 3x3, each with activation, + shortcut, no
  activation after the add; Darknet-53).
- `expand_ratio`: `conv_exp` width over the stage width; `block_ratio`: block width over the
  stage width; `bottle_ratio`: a block's inner width over its output width; `groups`: the
  cardinality of the 3x3 convs (ResNeXt); `cross_linear`: `conv_exp` has no activation (the
  ResNe(X)t cfgs); `down_growth`: `conv_down` already widens to the stage width (Darknet),
  otherwise it keeps its input width. Per-stage options take one value or one per stage.
- Every conv is conv (no bias, PyTorch padding) -> BatchNorm -> activation, LeakyReLU with
  timm's slope 0.01 (darknet's own `leaky` is 0.1; timm's weights go with 0.01).
  timm initialises the last BN of every block to zero (`zero_init_last`).

Counts differ between sources; timm's (with head: 21,616,168 / 20,569,896 / 27,642,184) are
the ones reproduced. The authors' repository lists 21.57M / 20.50M / 27.61M for its darknet
cfgs (whose 1x1 convs differ, see above); the design notes' "csp-rx50" backbone of 10.4M is
another, narrower network.

`features` gives the stage outputs at strides 4, 8, 16, 32 ("stage1".."stage4"): CSP-ResNets
reach stride 4 in the stem (7x7 stride-2 conv, 3x3 stride-2 max pool) and their first stage
keeps it; CSP-Darknet-53 has a stride-1 stem and five stride-2 stages, of which the first
(stride 2, timm's `stages.0`) is not returned, as detection heads start at stride 4 or 8.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.records import ModelInfo, Preprocessing

STAGE_KINDS = ("cross", "dark")
BLOCKS = ("bottleneck", "dark")


def conv_bn_act(out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                act: bool = True, zero_init: bool = False, *, opts: Mapping[str, Any],
                name: str) -> layers.ConvBN:
    """timm's ConvNormAct with the network's activation and BatchNorm constants."""
    return layers.ConvBN(out_channels, kernel_size, stride, groups=groups,
                         activation=opts["activation"] if act else None, zero_init=zero_init,
                         bn_decay=opts["bn_decay"], bn_eps=opts["bn_eps"], name=name)


class Block(hk.Module):
    """A residual block with an identity shortcut (timm's BottleneckBlock and DarkBlock)."""

    def __init__(self, out_channels: int, bottle_ratio: float, groups: int,
                 stochastic_depth_rate: float, opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.out_channels, self.groups = out_channels, groups
        self.inner = int(round(out_channels * bottle_ratio))
        self.stochastic_depth_rate, self.opts = stochastic_depth_rate, opts

    def __call__(self, x, is_training):
        opts, zero = self.opts, self.opts["zero_init_last"]
        if opts["block"] == "bottleneck":
            out = conv_bn_act(self.inner, 1, opts=opts, name="conv1")(x, is_training)
            out = conv_bn_act(self.inner, 3, groups=self.groups, opts=opts,
                            name="conv2")(out, is_training)
            out = conv_bn_act(self.out_channels, 1, act=False, zero_init=zero, opts=opts,
                            name="conv3")(out, is_training)
        else:
            out = conv_bn_act(self.inner, 1, opts=opts, name="conv1")(x, is_training)
            out = conv_bn_act(self.out_channels, 3, groups=self.groups, zero_init=zero,
                            opts=opts, name="conv2")(out, is_training)
        out = layers.stochastic_depth(out, self.stochastic_depth_rate, is_training) + x
        if opts["block"] == "bottleneck":
            out = layers.activation(opts["activation"])(out)
        return out


class Stage(hk.Module):
    """One stage, "cross" (CSP) or "dark" (plain); see the module docstring."""

    def __init__(self, width: int, stride: int, depth: int, cfg: Mapping[str, Any],
                 block_rates: Sequence[float], opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.width, self.stride, self.depth = width, stride, depth
        self.cfg, self.block_rates, self.opts = cfg, block_rates, opts

    @hk.name_like("__call__")
    def _blocks(self, x, is_training):
        cfg = self.cfg
        block_width = int(round(self.width * cfg["block_ratio"]))
        if x.shape[-1] != block_width:
            raise ValueError(
                f"{self.module_name}: the blocks' identity shortcuts need their input width "
                f"({x.shape[-1]}) to equal their output width ({block_width} = "
                f"{self.width} * block_ratio {cfg['block_ratio']})")
        for i in range(self.depth):
            x = Block(block_width, cfg["bottle_ratio"], cfg["groups"], self.block_rates[i],
                      self.opts, name=f"blocks_{i}")(x, is_training)
        return x

    def __call__(self, x, is_training):
        cfg, opts = self.cfg, self.opts
        if cfg["stage_kind"] == "dark":
            x = conv_bn_act(self.width, 3, self.stride, cfg["groups"], opts=opts,
                          name="conv_down")(x, is_training)
            return self._blocks(x, is_training)
        if self.stride != 1:
            down = self.width if cfg["down_growth"] else x.shape[-1]
            x = conv_bn_act(down, 3, self.stride, cfg["groups"], opts=opts,
                          name="conv_down")(x, is_training)
        expanded = int(round(self.width * cfg["expand_ratio"]))
        if expanded % 2:
            raise ValueError(f"{self.module_name}: the expansion conv's {expanded} channels "
                             "do not split into two halves")
        x = conv_bn_act(expanded, 1, act=not cfg["cross_linear"], opts=opts,
                      name="conv_exp")(x, is_training)
        cross, x = jnp.split(x, 2, axis=-1)
        x = self._blocks(x, is_training)
        x = conv_bn_act(expanded // 2, 1, opts=opts, name="conv_transition_b")(x, is_training)
        x = jnp.concatenate([cross, x], axis=-1)
        return conv_bn_act(self.width, 1, opts=opts, name="conv_transition")(x, is_training)


_PER_STAGE = ("strides", "groups", "expand_ratio", "bottle_ratio", "block_ratio", "cross_linear",
              "down_growth", "stage_kind")


class CSPNet(hk.Module):
    """Cross Stage Partial network (timm's CspNet). `__call__` gives logits (pooled features
    when num_classes=0); `features` gives the stage outputs at strides 4 to 32.

    Args:
      depths, widths: blocks and output channels per stage.
      strides, groups, expand_ratio, bottle_ratio, block_ratio, cross_linear, down_growth,
        stage_kind: per stage, one value for all or a tuple with one per stage (see the module
        docstring); stage_kind is "cross" or "dark".
      block: "bottleneck" or "dark".
      stem_width, stem_kernel, stem_stride, stem_pool: the stem conv, then (stem_pool) a 3x3
        stride-2 max pool.
      activation: a `layers.activation` name, used after every conv but the linear ones.
      zero_init_last: initialise the last BN scale of every block to zero.
      stochastic_depth_rate: drop rate of the last block; block l of L (0-based) gets
        rate * l / (L - 1), as timm's drop_path_rate.
      bn_decay, bn_eps: BatchNorm running-average decay (PyTorch momentum 0.1) and eps.
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 5, 2),
                 widths: Sequence[int] = (128, 256, 512, 1024),
                 strides: int | Sequence[int] = (1, 2, 2, 2), groups: int | Sequence[int] = 1,
                 expand_ratio: float | Sequence[float] = 2.0,
                 bottle_ratio: float | Sequence[float] = 0.5,
                 block_ratio: float | Sequence[float] = 1.0,
                 cross_linear: bool | Sequence[bool] = True,
                 down_growth: bool | Sequence[bool] = False,
                 stage_kind: str | Sequence[str] = "cross", block: str = "bottleneck",
                 stem_width: int = 64, stem_kernel: int = 7, stem_stride: int = 2,
                 stem_pool: bool = True, activation: str = "leaky_relu",
                 zero_init_last: bool = True, stochastic_depth_rate: float = 0.0,
                 num_classes: int = 1000, in_channels: int = 3, bn_decay: float = 0.9,
                 bn_eps: float = 1e-5, name: str = "cspnet"):
        super().__init__(name=name)
        if len(depths) != len(widths) or not depths:
            raise ValueError(f"depths and widths need one entry per stage, got {tuple(depths)} "
                             f"and {tuple(widths)}")
        n = len(depths)
        options = dict(strides=strides, groups=groups, expand_ratio=expand_ratio,
                       bottle_ratio=bottle_ratio, block_ratio=block_ratio,
                       cross_linear=cross_linear, down_growth=down_growth,
                       stage_kind=stage_kind)
        per_stage = {}
        for key, value in options.items():
            if isinstance(value, (str, int, float, bool)):
                value = (value,) * n
            if len(value) != n:
                raise ValueError(f"{key} needs one value or one per stage ({n}), got {value!r}")
            per_stage[key] = tuple(value)
        if bad := [k for k in per_stage["stage_kind"] if k not in STAGE_KINDS]:
            raise ValueError(f"stage_kind must be one of {STAGE_KINDS}, got {bad[0]!r}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        layers.activation(activation)  # an unknown name fails here, not deep inside a block
        self.depths, self.widths = tuple(depths), tuple(widths)
        self.stages = [{k: v[s] for k, v in per_stage.items()} for s in range(n)]
        self.stem = dict(width=stem_width, kernel=stem_kernel, stride=stem_stride,
                         pool=stem_pool)
        self.stochastic_depth_rate = stochastic_depth_rate
        self.num_classes, self.in_channels = num_classes, in_channels
        self.opts = dict(block=block, activation=activation, zero_init_last=zero_init_last,
                         bn_decay=bn_decay, bn_eps=bn_eps)

    def block_rates(self) -> list[float]:
        """Stochastic-depth drop rate of every block, in order."""
        total = sum(self.depths)
        return [self.stochastic_depth_rate * i / max(total - 1, 1) for i in range(total)]

    @hk.name_like("__call__")
    def stage_outputs(self, images, is_training: bool) -> list[tuple[int, jax.Array]]:
        """(stride, output) of every stage, in order."""
        layers.check_images(images, self.module_name, self.in_channels)
        stem = self.stem
        x = conv_bn_act(stem["width"], stem["kernel"], stem["stride"], opts=self.opts,
                      name="stem_conv1")(images, is_training)
        stride = stem["stride"]
        if stem["pool"]:
            x = layers.max_pool(x, 3, 2, padding=1)
            stride *= 2
        rates, outputs = self.block_rates(), []
        for s, (depth, width, cfg) in enumerate(zip(self.depths, self.widths, self.stages)):
            x = Stage(width, cfg["strides"], depth, cfg, rates[:depth], self.opts,
                      name=f"stages_{s}")(x, is_training)
            rates = rates[depth:]
            stride *= cfg["strides"]
            outputs.append((stride, x))
        return outputs

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        # The last stage at each stride >= 4 is that stride's map: stage1 = 4 ... stage4 = 32.
        return {f"stage{int(math.log2(stride)) - 1}": x
                for stride, x in self.stage_outputs(images, is_training) if stride >= 4}

    def __call__(self, images, is_training: bool):
        x = self.stage_outputs(images, is_training)[-1][1]
        return layers.classifier(x, self.num_classes, is_training,
                                 w_init=hk.initializers.RandomNormal(0.01), b_init=jnp.zeros)


# ----------------------------------------------------------------------------------------------
# timm's weight names.


def torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path (e.g. "stages_1.blocks_0.conv2.bn") -> timm's module name."""
    del config  # every variant names its modules alike
    if path == "fc":
        return "head.fc"
    path = re.sub(r"^stem_", "stem.", path)
    return re.sub(r"\b(stages|blocks)_(\d+)", r"\1.\2", path)


# ----------------------------------------------------------------------------------------------
# Registered variants: timm's model_cfgs. Counts: ../shared/reference/params.json (with head,
# without, BN stats). timm's pretrained_cfg: 256 px, crop_pct 0.887, bilinear, for all three.

_PREPROCESSING = Preprocessing(crop_fraction=0.887)


def _variant(name, counts, **config) -> ModelInfo:
    with_head, no_head, bn_stats = counts
    return ModelInfo(name=name, family="csp", builder=CSPNet, config=config,
                     reference=f"timm:{name}", reference_params=with_head,
                     reference_params_no_head=no_head, reference_bn_stat_elems=bn_stats,
                     train_size=256, test_size=256, preprocessing=_PREPROCESSING,
                     torch_name=torch_name)


CSP_RESNET_STAGES = dict(depths=(3, 3, 5, 2), strides=(1, 2, 2, 2), cross_linear=True)

VARIANTS = (
    _variant("cspresnet50", (21616168, 20591168, 40320), widths=(128, 256, 512, 1024),
             expand_ratio=2.0, bottle_ratio=0.5, block_ratio=1.0, **CSP_RESNET_STAGES),
    _variant("cspresnext50", (20569896, 18520896, 57472), widths=(256, 512, 1024, 2048),
             groups=32, expand_ratio=1.0, bottle_ratio=1.0, block_ratio=0.5,
             **CSP_RESNET_STAGES),
    _variant("cspdarknet53", (27642184, 26617184, 35328), depths=(1, 2, 8, 8, 4),
             widths=(64, 128, 256, 512, 1024), strides=2, expand_ratio=(2.0, 1, 1, 1, 1),
             bottle_ratio=(0.5, 1, 1, 1, 1), block_ratio=(1.0, 0.5, 0.5, 0.5, 0.5),
             cross_linear=False, down_growth=True, block="dark", stem_width=32, stem_kernel=3,
             stem_stride=1, stem_pool=False),
)
