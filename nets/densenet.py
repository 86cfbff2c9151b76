"""DenseNet-BC (Huang et al. 2017, "Densely Connected Convolutional Networks"), exact to
torchvision's `densenet121/161/169/201`, and the paper's CIFAR DenseNet-BC (L, k) as the
authors' code builds it (liuzhuang13/DenseNet, models/densenet.lua).

Every dense layer reads the concatenation of all earlier outputs of its block and adds
`growth_rate` channels: BN-ReLU-1x1 conv to `bn_size * growth_rate` (the bottleneck),
BN-ReLU-3x3 conv to `growth_rate`. Between blocks a transition compresses the C channels to
floor(compression * C) (theta, 0.5 in "-BC": BN-ReLU-1x1 conv; the floor is the Lua code's
`math.floor(nChannels * reduction)`) and halves the resolution (2x2 average pool).

The CIFAR networks (`stem="cifar"`): a 3x3 conv to 2k channels (no BN, ReLU or pooling: the
first dense layer's BN-ReLU follows), three dense blocks of (L - 4) / 6 layers each, the final
BN-ReLU, global average pool and fc; convs without bias, He-normal over fan-out as the Lua code
initialises them. Parameter counts with 10 classes: DenseNet-BC L=100 k=12 769,162,
L=250 k=24 15,324,406, L=190 k=40 25,624,430 (the paper's Table 2: 0.8M, 15.3M, 25.6M).

Module names mirror torchvision's (`denseblock2/denselayer5/norm1` is
`features.denseblock2.denselayer5.norm1`), so weight conversion is a renaming (`torch_name`).
keras.applications' DenseNet121/169/201 are the same networks with Keras' BatchNorm constants:
the `keras_densenet*` twins, converted under Keras' layer names (`keras_name`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.records import CIFAR10_PREPROCESSING, ModelInfo

# torchvision's `nn.init.kaiming_normal_(w)` with its defaults: mode="fan_in" (not the fan_out
# of its ResNets), gain sqrt(2), untruncated normal. The authors' Lua code scales by fan-out.
CONV_INIT = hk.initializers.VarianceScaling(2.0, "fan_in", "normal")
CONV_INITS = {"fan_in": CONV_INIT, "fan_out": hk.initializers.VarianceScaling(2.0, "fan_out",
                                                                               "normal")}
STEMS = ("imagenet", "cifar")


def _bn(opts, name):
    return layers.BatchNorm(opts["bn_decay"], opts["bn_eps"], opts["unbiased_running_var"],
                            name=name)


class DenseLayer(hk.Module):
    """BN-ReLU-1x1 conv (bottleneck) - BN-ReLU-3x3 conv - dropout; returns the new channels only.

    With `memory_efficient` the bottleneck, concatenation included, runs under `hk.remat`: its
    outputs are recomputed in the backward pass instead of stored, as torchvision's
    `memory_efficient=True` (torch.utils.checkpoint over the same function; Pleiss et al. 2017).
    """

    def __init__(self, growth_rate: int, bn_size: int, drop_rate: float, memory_efficient: bool,
                 opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.growth_rate, self.bn_size = growth_rate, bn_size
        self.drop_rate, self.memory_efficient = drop_rate, memory_efficient
        self.opts = opts

    def __call__(self, inputs: Sequence[jax.Array], is_training: bool):
        def bottleneck(inputs):
            x = jnp.concatenate(inputs, axis=-1)
            x = jax.nn.relu(_bn(self.opts, "norm1")(x, is_training))
            return layers.Conv(self.bn_size * self.growth_rate, 1, w_init=self.opts["w_init"],
                               name="conv1")(x)

        if self.memory_efficient:
            bottleneck = hk.remat(bottleneck)
        x = bottleneck(list(inputs))
        x = jax.nn.relu(_bn(self.opts, "norm2")(x, is_training))
        x = layers.Conv(self.growth_rate, 3, w_init=self.opts["w_init"], name="conv2")(x)
        if is_training and self.drop_rate > 0:
            x = hk.dropout(hk.next_rng_key(), self.drop_rate, x)
        return x


class DenseBlock(hk.Module):
    """`num_layers` dense layers; the output concatenates the input and every layer's output."""

    def __init__(self, num_layers: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool, opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.num_layers = num_layers
        self.layer_args = (growth_rate, bn_size, drop_rate, memory_efficient, opts)

    def __call__(self, x, is_training: bool):
        maps = [x]
        for i in range(self.num_layers):
            maps.append(DenseLayer(*self.layer_args, name=f"denselayer{i + 1}")(maps, is_training))
        return jnp.concatenate(maps, axis=-1)


class Transition(hk.Module):
    """BN-ReLU-1x1 conv to `out_channels`, then 2x2 average pooling with stride 2."""

    def __init__(self, out_channels: int, opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.out_channels, self.opts = out_channels, opts

    def __call__(self, x, is_training: bool):
        x = jax.nn.relu(_bn(self.opts, "norm")(x, is_training))
        x = layers.Conv(self.out_channels, 1, w_init=self.opts["w_init"], name="conv")(x)
        return layers.avg_pool(x, 2, 2)


class DenseNet(hk.Module):
    """DenseNet-BC. `__call__` gives logits (pooled features when num_classes=0); `features`
    gives one map per dense block.

    Feature maps (what a detection or dense head would tap; the same taps as timm's
    `features_only` DenseNet at reductions 4-32): "stage{i}" is the output of dense block i -
    the concatenation, before the transition's BN-ReLU and pooling - for all but the last
    block, and the last block's output after the final BN (norm5) and ReLU. With the four blocks
    of the ImageNet variants the strides are 4, 8, 16, 32 and the channels, e.g. for
    DenseNet-121, 256, 512, 1024, 1024; the CIFAR variants' three blocks are at strides 1, 2, 4.

    Args:
      growth_rate: k, the channels each dense layer adds (32; 48 for DenseNet-161).
      block_config: dense layers per block, e.g. (6, 12, 24, 16) for DenseNet-121; any
        number of blocks (each after the first halves the resolution).
      num_init_features: channels of the stem conv (64; 96 for DenseNet-161; 2k on CIFAR).
      bn_size: the bottleneck width as a multiple of growth_rate (4).
      compression: theta, a transition's output channels as a fraction of its input's
        (floor(theta * C); 0.5 in DenseNet-BC, 1 for no compression).
      stem: "imagenet" (7x7 conv stride 2, BN-ReLU, 3x3 max pool stride 2) or "cifar" (3x3
        conv stride 1 alone, the authors' CIFAR network).
      conv_init: the He-normal init's fan of every conv: "fan_in" (torchvision) or "fan_out"
        (the authors' Lua code).
      drop_rate: dropout rate on each dense layer's new channels while training
        (torchvision's `drop_rate`; kept channels scaled by 1 / (1 - rate)).
      memory_efficient: recompute each dense layer's concatenation, BN, ReLU and 1x1 conv in
        the backward pass instead of storing them (`hk.remat`); outputs and gradients are
        unchanged, activation memory falls from quadratic to linear in the block depth.
      bn_decay, bn_eps: BatchNorm running-average decay (PyTorch momentum 0.1 = decay 0.9) and eps.
      unbiased_running_var: the running variance averages the unbiased batch variance (PyTorch)
        or the biased one (Keras).

    Initialisation as torchvision: He-normal over fan-in for every conv (torchvision's
    ResNets use fan-out; its DenseNet keeps kaiming_normal_'s default; `conv_init`), BN scale 1
    and offset 0, the classifier weight PyTorch's nn.Linear default and its bias 0 (the Lua
    code's too).
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 memory_efficient: bool = False, compression: float = 0.5,
                 stem: str = "imagenet", conv_init: str = "fan_in", num_classes: int = 1000,
                 in_channels: int = 3, bn_decay: float = 0.9, bn_eps: float = 1e-5,
                 unbiased_running_var: bool = True, name: str = "densenet"):
        super().__init__(name=name)
        block_config = tuple(block_config)
        if not block_config or any(int(n) != n or n < 1 for n in block_config):
            raise ValueError(f"block_config must be one or more positive layer counts, "
                             f"got {block_config!r}")
        for option, value in (("growth_rate", growth_rate), ("bn_size", bn_size),
                              ("num_init_features", num_init_features)):
            if int(value) != value or value < 1:
                raise ValueError(f"{option} must be a positive integer, got {value!r}")
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose from {STEMS}")
        if conv_init not in CONV_INITS:
            raise ValueError(f"unknown conv_init {conv_init!r}; choose from {tuple(CONV_INITS)}")
        self.compression, self.stem = compression, stem
        self.growth_rate, self.block_config = growth_rate, block_config
        self.num_init_features, self.bn_size = num_init_features, bn_size
        self.drop_rate, self.memory_efficient = drop_rate, memory_efficient
        self.num_classes, self.in_channels = num_classes, in_channels
        self.opts = dict(bn_decay=bn_decay, bn_eps=bn_eps,
                         unbiased_running_var=unbiased_running_var, w_init=CONV_INITS[conv_init])

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        if self.stem == "cifar":
            x = layers.Conv(self.num_init_features, 3, w_init=self.opts["w_init"],
                            name="conv0")(images)
        else:
            x = layers.Conv(self.num_init_features, 7, 2, w_init=self.opts["w_init"],
                            name="conv0")(images)
            x = jax.nn.relu(_bn(self.opts, "norm0")(x, is_training))
            x = layers.max_pool(x, 3, 2, padding=1)
        maps, last = {}, len(self.block_config)
        for i, num_layers in enumerate(self.block_config, start=1):
            x = DenseBlock(num_layers, self.growth_rate, self.bn_size, self.drop_rate,
                           self.memory_efficient, self.opts, name=f"denseblock{i}")(x, is_training)
            if i < last:
                maps[f"stage{i}"] = x
                x = Transition(math.floor(self.compression * x.shape[-1]), self.opts,
                               name=f"transition{i}")(x, is_training)
        maps[f"stage{last}"] = jax.nn.relu(_bn(self.opts, "norm5")(x, is_training))
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)[f"stage{len(self.block_config)}"]
        return layers.classifier(x, self.num_classes, is_training, name="classifier",
                                 b_init=jnp.zeros)


def torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path -> torchvision's: everything but the classifier lives under
    `features` ("denseblock1.denselayer1.norm1" -> "features.denseblock1.denselayer1.norm1")."""
    del config
    return path if path == "classifier" else f"features.{path}"


# ----------------------------------------------------------------------------------------------
# Registered variants. Counts: ../shared/reference/params.json (with head, without, BN stats).


def _variant(name, counts, **config) -> ModelInfo:
    with_head, no_head, bn_stats = counts
    return ModelInfo(name=name, family="densenet", builder=DenseNet, config=config,
                     reference=f"torchvision:{name}", reference_params=with_head,
                     reference_params_no_head=no_head, reference_bn_stat_elems=bn_stats,
                     feature_strides=(4, 8, 16, 32), classifier="classifier",
                     torch_name=torch_name)


VARIANTS = (
    _variant("densenet121", (7978856, 6953856, 83648), block_config=(6, 12, 24, 16)),
    _variant("densenet161", (28681000, 26472000, 219936), growth_rate=48,
             block_config=(6, 12, 36, 24), num_init_features=96),
    _variant("densenet169", (14149480, 12484480, 158400), block_config=(6, 12, 32, 32)),
    _variant("densenet201", (20013928, 18092928, 229056), block_config=(6, 12, 48, 32)),
)


def _cifar_variant(depth: int, growth_rate: int) -> ModelInfo:
    """DenseNet-BC (L=depth, k=growth_rate) for CIFAR: three blocks of (L - 4) / 6 dense layers
    (each two convs; the stem conv, two transitions and the fc make the other 4 layers)."""
    return ModelInfo(name=f"densenet_bc_{depth}_{growth_rate}", family="densenet",
                     builder=DenseNet,
                     config=dict(growth_rate=growth_rate, block_config=((depth - 4) // 6,) * 3,
                                 num_init_features=2 * growth_rate, stem="cifar",
                                 conv_init="fan_out"),
                     reference="paper:DenseNet-BC (Huang et al. 2017) / liuzhuang13/DenseNet",
                     train_size=32, test_size=32, preprocessing=CIFAR10_PREPROCESSING,
                     feature_strides=(1, 2, 4), classifier="classifier",
                     task_metadata=dict(num_classes=10), torch_name=torch_name)


# The paper's CIFAR networks (Table 2), 10 classes by default (CIFAR-10).
VARIANTS += tuple(_cifar_variant(depth, k) for depth, k in ((100, 12), (250, 24), (190, 40)))


def keras_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path -> keras.applications' DenseNet layer name: dense block b is
    Keras' stage "conv{b + 1}" ("denseblock1.denselayer3.conv2" -> "conv2_block3_2_conv"),
    transition b its "pool{b + 1}" ("transition1.norm" -> "pool2_bn")."""
    del config
    parts = path.split(".")
    if parts[0].startswith("denseblock"):
        block, layer = int(parts[0][len("denseblock"):]), int(parts[1][len("denselayer"):])
        kind = {"norm1": "0_bn", "conv1": "1_conv", "norm2": "1_bn", "conv2": "2_conv"}[parts[2]]
        return f"conv{block + 1}_block{layer}_{kind}"
    if parts[0].startswith("transition"):
        return f"pool{int(parts[0][len('transition'):]) + 1}_{parts[1].replace('norm', 'bn')}"
    return {"conv0": "conv1_conv", "norm0": "conv1_bn", "norm5": "bn",
            "classifier": "predictions"}[parts[0]]


def _keras_twin(depth: int) -> ModelInfo:
    """keras.applications' DenseNet{depth}: torchvision's network (same layers, padding and
    counts) with Keras' BatchNorm (momentum 0.99, eps 1.001e-5, biased running variance)."""
    twin = {info.name: info for info in VARIANTS}[f"densenet{depth}"]
    return dataclasses.replace(
        twin, name=f"keras_densenet{depth}", reference=f"keras:DenseNet{depth}",
        config=dict(twin.config, bn_decay=0.99, bn_eps=1.001e-5, unbiased_running_var=False),
        torch_name=None, keras_name=keras_name, keras_builder=f"DenseNet{depth}")


VARIANTS += tuple(_keras_twin(depth) for depth in (121, 169, 201))
