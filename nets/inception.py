"""Inception networks: GoogLeNet (Szegedy et al. 2015, "Going Deeper with Convolutions"), exact to
torchvision's `googlenet`, and Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception
Architecture for Computer Vision"), exact to torchvision's `inception_v3` and to
keras.applications' `InceptionV3`.

An Inception block runs parallel branches on the same input and concatenates them: a 1x1 conv;
1x1 convs that set the width for a 3x3 (or 5x5) conv; a pooling followed by a 1x1 conv.
Inception-v3 factorises larger kernels: a 5x5 as two 3x3s and, in its 17x17 and 8x8 blocks, an
n x n as a 1 x n conv then an n x 1 conv (spatially separable convolution: 2n instead of n^2
weights per channel pair). Every conv is conv (no bias) - BatchNorm (eps 1e-3) - ReLU.

The blocks are rows of data (`Unit`, `Pool`, `Split` below), which the one `InceptionBlock`
module runs; the same rows give the Keras layer names, which Keras numbers in creation order.

Where the references differ (both Inception-v3s compute the same convs and pools):
  torchvision: BN with scale, momentum 0.1 (decay 0.9), unbiased running variance; the 3x3
    average pools count their zero padding; dropout before the classifier (0.5; GoogLeNet 0.2).
  keras: BN without scale (`scale=False`), momentum 0.99, biased variance; the average pools
    (padding "same") average over the pixels inside the image only; no dropout.
torchvision's GoogLeNet pools with `ceil_mode=True`, and its "5x5" branch is a 3x3 conv
(torchvision issue 906, kept by its published weights), reproduced here.

Module names are torchvision's ("Mixed_6b/branch7x7_2/conv" is `Mixed_6b.branch7x7_2.conv`;
GoogLeNet's "inception4a/branch2_1" is `inception4a.branch2.1`), so torch conversion is a
renaming (`torch_name`); `keras_name` gives the Keras layer names.

Auxiliary heads (`aux_logits=True`, off in the registered variants): torchvision's heads, run
only in training, where `__call__` returns `layers.AuxiliaryOutputs` whose loss weights are the
reference recipes': 0.3 for each of GoogLeNet's two heads (the paper, section 5) and 0.4 for
Inception-v3's (TF-slim's train_image_classifier.py, the Inception-v3 training script of the
TF models repository; label smoothing applies to it too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.records import UNIT_RANGE_PREPROCESSING, ModelInfo


@dataclasses.dataclass(frozen=True)
class Unit:
    """conv - BN - ReLU; `valid`: unpadded (else "same": symmetric k // 2 per side)."""

    name: str
    out: int
    kernel: int | tuple[int, int]
    stride: int = 1
    valid: bool = False


@dataclasses.dataclass(frozen=True)
class Pool:
    """Max or average pooling. kind "max": unpadded, floor (Inception-v3, both references);
    "max_ceil": torch's ceil_mode=True with `padding` (GoogLeNet); "avg": `padding` per side,
    whether the padding counts is the model's option."""

    kind: str
    window: int
    stride: int
    padding: int = 0


@dataclasses.dataclass(frozen=True)
class Split:
    """Units applied to the same input, outputs concatenated (Inception-v3's 8x8 blocks)."""

    units: tuple[Unit, ...]


# A block: branches, each a sequence of steps; outputs concatenated in branch order.
Block = tuple[tuple[Unit | Pool | Split, ...], ...]


def _units(steps) -> list[Unit]:
    """The conv units of a step sequence, in creation order."""
    out = []
    for step in steps:
        if isinstance(step, Unit):
            out.append(step)
        elif isinstance(step, Split):
            out.extend(step.units)
    return out


# ----------------------------------------------------------------------------------------------
# GoogLeNet's blocks: (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) as torchvision's.


def _v1_block(c1, c3r, c3, c5r, c5, pool) -> Block:
    return ((Unit("branch1", c1, 1),),
            (Unit("branch2_0", c3r, 1), Unit("branch2_1", c3, 3)),
            (Unit("branch3_0", c5r, 1), Unit("branch3_1", c5, 3)),  # 3x3: torchvision's
            (Pool("max_ceil", 3, 1, 1), Unit("branch4_1", pool, 1)))


_CEIL_POOL = Pool("max_ceil", 3, 2)
GOOGLENET_STEM = (Unit("conv1", 64, 7, 2), Pool("max_ceil", 3, 2), Unit("conv2", 64, 1),
                  Unit("conv3", 192, 3))
# (name, block) or a pool between blocks; a "stage" marks the end of a feature stage.
GOOGLENET_BODY = (
    "stage", _CEIL_POOL, ("inception3a", _v1_block(64, 96, 128, 16, 32, 32)),
    ("inception3b", _v1_block(128, 128, 192, 32, 96, 64)), "stage",
    _CEIL_POOL, ("inception4a", _v1_block(192, 96, 208, 16, 48, 64)),
    ("inception4b", _v1_block(160, 112, 224, 24, 64, 64)),
    ("inception4c", _v1_block(128, 128, 256, 24, 64, 64)),
    ("inception4d", _v1_block(112, 144, 288, 32, 64, 64)),
    ("inception4e", _v1_block(256, 160, 320, 32, 128, 128)), "stage",
    Pool("max_ceil", 2, 2), ("inception5a", _v1_block(256, 160, 320, 32, 128, 128)),
    ("inception5b", _v1_block(384, 192, 384, 48, 128, 128)), "stage")
# Auxiliary heads read the outputs of these blocks.
GOOGLENET_AUX = {"inception4a": "aux1", "inception4d": "aux2"}

# ----------------------------------------------------------------------------------------------
# Inception-v3's blocks (torchvision's InceptionA-E; Keras' mixed0-mixed10).

_AVG = Pool("avg", 3, 1, 1)
_MAX = Pool("max", 3, 2)


def _a(pool_features) -> Block:
    return ((Unit("branch1x1", 64, 1),),
            (Unit("branch5x5_1", 48, 1), Unit("branch5x5_2", 64, 5)),
            (Unit("branch3x3dbl_1", 64, 1), Unit("branch3x3dbl_2", 96, 3),
             Unit("branch3x3dbl_3", 96, 3)),
            (_AVG, Unit("branch_pool", pool_features, 1)))


_B = ((Unit("branch3x3", 384, 3, 2, valid=True),),
      (Unit("branch3x3dbl_1", 64, 1), Unit("branch3x3dbl_2", 96, 3),
       Unit("branch3x3dbl_3", 96, 3, 2, valid=True)),
      (_MAX,))


def _c(c7) -> Block:
    return ((Unit("branch1x1", 192, 1),),
            (Unit("branch7x7_1", c7, 1), Unit("branch7x7_2", c7, (1, 7)),
             Unit("branch7x7_3", 192, (7, 1))),
            (Unit("branch7x7dbl_1", c7, 1), Unit("branch7x7dbl_2", c7, (7, 1)),
             Unit("branch7x7dbl_3", c7, (1, 7)), Unit("branch7x7dbl_4", c7, (7, 1)),
             Unit("branch7x7dbl_5", 192, (1, 7))),
            (_AVG, Unit("branch_pool", 192, 1)))


_D = ((Unit("branch3x3_1", 192, 1), Unit("branch3x3_2", 320, 3, 2, valid=True)),
      (Unit("branch7x7x3_1", 192, 1), Unit("branch7x7x3_2", 192, (1, 7)),
       Unit("branch7x7x3_3", 192, (7, 1)), Unit("branch7x7x3_4", 192, 3, 2, valid=True)),
      (_MAX,))
_E = ((Unit("branch1x1", 320, 1),),
      (Unit("branch3x3_1", 384, 1),
       Split((Unit("branch3x3_2a", 384, (1, 3)), Unit("branch3x3_2b", 384, (3, 1))))),
      (Unit("branch3x3dbl_1", 448, 1), Unit("branch3x3dbl_2", 384, 3),
       Split((Unit("branch3x3dbl_3a", 384, (1, 3)), Unit("branch3x3dbl_3b", 384, (3, 1))))),
      (_AVG, Unit("branch_pool", 192, 1)))

V3_STEM = (Unit("Conv2d_1a_3x3", 32, 3, 2, valid=True), Unit("Conv2d_2a_3x3", 32, 3, valid=True),
           Unit("Conv2d_2b_3x3", 64, 3), _MAX, Unit("Conv2d_3b_1x1", 80, 1),
           Unit("Conv2d_4a_3x3", 192, 3, valid=True))
V3_BODY = ("stage", _MAX, ("Mixed_5b", _a(32)), ("Mixed_5c", _a(64)), ("Mixed_5d", _a(64)),
           "stage", ("Mixed_6a", _B), ("Mixed_6b", _c(128)), ("Mixed_6c", _c(160)),
           ("Mixed_6d", _c(160)), ("Mixed_6e", _c(192)), "stage", ("Mixed_7a", _D),
           ("Mixed_7b", _E), ("Mixed_7c", _E), "stage")
V3_AUX = {"Mixed_6e": "AuxLogits"}
V3_MIN_SIZE = 75  # the smallest input its unpadded convs and pools take (torchvision's min_size)
GOOGLENET_MIN_SIZE = 15  # the smallest input GoogLeNet takes
V3_AUX_MIN_MAP = 17  # the aux head's 5x5 / 3 pooling, then its unpadded 5x5 conv (299 px input)


def v3_stage_sizes(size: int) -> tuple[int, int, int, int]:
    """Inception-v3's stage sides for a size x size input: 71, 35, 17, 8 at 299 px (the unpadded
    3x3 convs take 2 pixels, the unpadded stride-2 3x3 convs and pools halve (n - 1))."""
    half = lambda n: (n - 3) // 2 + 1  # noqa: E731 - a 3x3 stride-2 window, unpadded
    stage1 = half(half(size) - 2) - 2
    stage2 = half(stage1)
    return stage1, stage2, half(stage2), half(half(stage2))


# ----------------------------------------------------------------------------------------------
# Modules


def _pool(x, pool: Pool, count_padding: bool):
    if pool.kind == "avg":
        return layers.avg_pool(x, pool.window, pool.stride, pool.padding,
                               count_include_pad=count_padding)
    if pool.kind == "max":
        return layers.max_pool(x, pool.window, pool.stride)
    # torch's ceil_mode: the last window may overhang the high side (padded with -inf) as long
    # as it starts inside the input or the low padding.
    pads = []
    for n in x.shape[1:-1]:
        span = n + 2 * pool.padding - pool.window
        out = -(-span // pool.stride) + 1
        if (out - 1) * pool.stride >= n + pool.padding:
            out -= 1
        extra = max((out - 1) * pool.stride + pool.window - n - 2 * pool.padding, 0)
        pads.append((pool.padding, pool.padding + extra))
    return layers.max_pool(x, pool.window, pool.stride, padding=pads)


class ConvUnit(hk.Module):
    """torchvision's BasicConv2d: conv (no bias) `conv`, BatchNorm `bn`, ReLU."""

    def __init__(self, unit: Unit, opts: Mapping[str, Any], w_init=None):
        super().__init__(name=unit.name)
        self.unit, self.opts, self.w_init = unit, opts, w_init

    def __call__(self, x, is_training: bool):
        u, o = self.unit, self.opts
        x = layers.Conv(u.out, u.kernel, u.stride, padding=0 if u.valid else "torch",
                        w_init=self.w_init or o["conv_init"], name="conv")(x)
        x = layers.BatchNorm(o["bn_decay"], o["bn_eps"], o["unbiased_running_var"],
                             create_scale=o["bn_scale"], name="bn")(x, is_training)
        return jax.nn.relu(x)


class InceptionBlock(hk.Module):
    """Runs a `Block`: each branch's steps in order, the branches' outputs concatenated."""

    def __init__(self, block: Block, opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.block, self.opts = block, opts

    def __call__(self, x, is_training: bool):
        return jnp.concatenate([_run(branch, x, self.opts, is_training)
                                for branch in self.block], axis=-1)


def _run(steps, x, opts, is_training):
    for step in steps:
        if isinstance(step, Unit):
            x = ConvUnit(step, opts)(x, is_training)
        elif isinstance(step, Split):
            x = jnp.concatenate([ConvUnit(u, opts)(x, is_training) for u in step.units], -1)
        else:
            x = _pool(x, step, opts["pool_counts_padding"])
    return x


def adaptive_avg_pool(x, size: int):
    """torch's adaptive_avg_pool2d to size x size: output cell i averages input rows
    floor(i n / size) to ceil((i + 1) n / size) (overlapping windows where size does not divide
    n, repeated rows where n < size); rows, then columns."""
    for axis in (1, 2):
        n = x.shape[axis]
        cells = [jax.lax.slice_in_dim(x, i * n // size, -(-(i + 1) * n // size), axis=axis)
                 for i in range(size)]
        x = jnp.concatenate([jnp.mean(c, axis=axis, keepdims=True) for c in cells], axis=axis)
    return x


def _flatten_channels_first(x):
    """torch.flatten of the NCHW map: the order the reference's dense weights read."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class GoogLeNetAux(hk.Module):
    """torchvision's InceptionAux of GoogLeNet: adaptive average pool to 4x4, 1x1 conv unit to
    128, flatten, fc1 (1024) - ReLU - dropout - fc2 (classes)."""

    def __init__(self, num_classes: int, dropout_rate: float, opts, name: str):
        super().__init__(name=name)
        self.num_classes, self.dropout_rate, self.opts = num_classes, dropout_rate, opts

    def __call__(self, x, is_training: bool):
        x = ConvUnit(Unit("conv", 128, 1), self.opts)(adaptive_avg_pool(x, 4), is_training)
        x = _flatten_channels_first(x.astype(jnp.float32))
        inits = dict(w_init=self.opts["linear_init"], b_init=self.opts["linear_bias_init"])
        x = jax.nn.relu(layers.Linear(1024, name="fc1", **inits)(x))
        if is_training and self.dropout_rate:
            x = hk.dropout(hk.next_rng_key(), self.dropout_rate, x)
        return layers.Linear(self.num_classes, name="fc2", **inits)(x)


class InceptionV3Aux(hk.Module):
    """torchvision's InceptionAux of Inception-v3: 5x5 average pool with stride 3, 1x1 conv
    unit `conv0` (128), unpadded 5x5 conv unit `conv1` (768), global mean, `fc` (classes)."""

    def __init__(self, num_classes: int, opts, name: str):
        super().__init__(name=name)
        self.num_classes, self.opts = num_classes, opts

    def __call__(self, x, is_training: bool):
        if min(x.shape[1:3]) < V3_AUX_MIN_MAP:
            raise ValueError(
                f"{self.module_name}: Inception-v3's auxiliary head needs the 17x17 map of "
                f"299 px inputs or larger; got {x.shape[1]}x{x.shape[2]} (train with "
                f"aux_logits=False below 299 px)")
        x = layers.avg_pool(x, 5, 3)
        x = ConvUnit(Unit("conv0", 128, 1), self.opts)(x, is_training)
        x = ConvUnit(Unit("conv1", 768, 5, valid=True), self.opts,
                     w_init=self.opts["aux_conv_init"])(x, is_training)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return layers.Linear(self.num_classes, w_init=self.opts["aux_fc_init"],
                             b_init=self.opts["linear_bias_init"], name="fc")(x)


def _normal(stddev):
    # torch's trunc_normal_(std, a=-2, b=2) truncates at +-2 absolute: 20+ standard
    # deviations for these std, i.e. a normal distribution.
    return hk.initializers.RandomNormal(stddev)


class Inception(hk.Module):
    """GoogLeNet or Inception-v3: a stem, Inception blocks, a classifier; `features` gives the
    maps at strides 4, 8, 16, 32 (the last stem conv's, then the last block's of each
    resolution: GoogLeNet's conv3, inception3b, 4e, 5b; Inception-v3's Conv2d_4a_3x3, Mixed_5d,
    6e, 7c - at 299 px 71, 35, 17 and 8 pixels wide, its unpadded convs shrink every map).

    Args:
      architecture: "googlenet" or "inception_v3".
      aux_logits: torchvision's auxiliary heads; while training `__call__` then returns
        `layers.AuxiliaryOutputs` (the heads run only in training; Inception-v3's needs 299 px).
      aux_loss_weight: each auxiliary head's loss weight (GoogLeNet 0.3, Inception-v3 0.4).
      dropout_rate: before the classifier while training; aux_dropout_rate: GoogLeNet's heads'.
      bn_decay, bn_eps, bn_scale, unbiased_running_var: BatchNorm (torchvision: 0.9, 1e-3, scale,
        unbiased running variance; Keras: 0.99, 1e-3, no scale, biased).
      pool_counts_padding: whether the branches' 3x3 average pools count their zero padding
        (torch's count_include_pad, True) or not (Keras / TF "same" pooling).
      init: "torchvision" (normal, std 0.01 for GoogLeNet, 0.1 for Inception-v3 with its
        head's 0.01 / 0.001; torch's default Linear biases) or "keras" (Glorot uniform, zero
        biases).
    """

    def __init__(self, architecture: str = "inception_v3", num_classes: int = 1000,
                 aux_logits: bool = False, aux_loss_weight: float | None = None,
                 dropout_rate: float = 0.5, aux_dropout_rate: float = 0.7,
                 bn_decay: float = 0.9, bn_eps: float = 1e-3, bn_scale: bool = True,
                 unbiased_running_var: bool = True, pool_counts_padding: bool = True,
                 init: str = "torchvision", in_channels: int = 3, name: str | None = None):
        if architecture not in ("googlenet", "inception_v3"):
            raise ValueError(f"architecture must be 'googlenet' or 'inception_v3', got "
                             f"{architecture!r}")
        if init not in ("torchvision", "keras"):
            raise ValueError(f"init must be 'torchvision' or 'keras', got {init!r}")
        if aux_logits and not num_classes:
            raise ValueError("aux_logits=True: the auxiliary heads are classifiers and need "
                             "num_classes > 0")
        for option, rate in (("dropout_rate", dropout_rate),
                             ("aux_dropout_rate", aux_dropout_rate)):
            if not 0 <= rate < 1:
                raise ValueError(f"{option} must be in [0, 1), got {rate!r}")
        super().__init__(name=name or architecture)
        self.architecture, self.num_classes = architecture, num_classes
        self.aux_logits, self.in_channels = aux_logits, in_channels
        self.dropout_rate, self.aux_dropout_rate = dropout_rate, aux_dropout_rate
        v1 = architecture == "googlenet"
        self.aux_loss_weight = (0.3 if v1 else 0.4) if aux_loss_weight is None else (
            aux_loss_weight)
        self.stem, self.body = (GOOGLENET_STEM, GOOGLENET_BODY) if v1 else (V3_STEM, V3_BODY)
        self.aux_heads = GOOGLENET_AUX if v1 else V3_AUX
        self.min_size = GOOGLENET_MIN_SIZE if v1 else V3_MIN_SIZE
        keras = init == "keras"
        glorot = hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform")
        self.opts = dict(
            bn_decay=bn_decay, bn_eps=bn_eps, bn_scale=bn_scale,
            unbiased_running_var=unbiased_running_var, pool_counts_padding=pool_counts_padding,
            conv_init=glorot if keras else _normal(0.01 if v1 else 0.1),
            linear_init=glorot if keras else _normal(0.01 if v1 else 0.1),
            aux_conv_init=glorot if keras else _normal(0.01),
            aux_fc_init=glorot if keras else _normal(0.001),
            linear_bias_init=jnp.zeros if keras else None)

    @hk.transparent
    def _stages(self, images, is_training: bool, taps):
        """The stage maps and the auxiliary heads' inputs {head: map}."""
        layers.check_images(images, self.module_name, self.in_channels)
        if min(images.shape[1:3]) < self.min_size:
            raise ValueError(f"{self.module_name} takes images of at least {self.min_size} x "
                             f"{self.min_size} px (its pools and unpadded convs); got "
                             f"{images.shape[1]} x {images.shape[2]}")
        x = _run(self.stem, images, self.opts, is_training)
        maps, aux_inputs = {}, {}
        for item in self.body:
            if item == "stage":
                maps[f"stage{len(maps) + 1}"] = x
            elif isinstance(item, Pool):
                x = _pool(x, item, self.opts["pool_counts_padding"])
            else:
                block_name, block = item
                x = InceptionBlock(block, self.opts, name=block_name)(x, is_training)
                if block_name in self.aux_heads and taps:
                    aux_inputs[self.aux_heads[block_name]] = x
        return maps, aux_inputs

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        return self._stages(images, is_training, taps=False)[0]

    def __call__(self, images, is_training: bool):
        # The heads also run when initialising in eval mode, so that either mode's init gives
        # the same parameters.
        run_aux = self.aux_logits and (is_training or hk.running_init())
        maps, aux_inputs = self._stages(images, is_training, taps=run_aux)
        logits = layers.classifier(maps[f"stage{len(maps)}"], self.num_classes, is_training,
                                   dropout_rate=self.dropout_rate, name="fc",
                                   w_init=self.opts["linear_init"],
                                   b_init=self.opts["linear_bias_init"])
        if not run_aux:
            return logits
        auxiliary = tuple(self.aux_head(head)(x, is_training) for head, x in aux_inputs.items())
        if not is_training:
            return logits
        return layers.AuxiliaryOutputs(logits, auxiliary,
                                       (float(self.aux_loss_weight),) * len(auxiliary))

    @hk.transparent
    def aux_head(self, name) -> hk.Module:
        """The auxiliary head `name` ("aux1", "aux2"; "AuxLogits"), a submodule of this one."""
        if self.architecture == "googlenet":
            return GoogLeNetAux(self.num_classes, self.aux_dropout_rate, self.opts, name=name)
        return InceptionV3Aux(self.num_classes, self.opts, name=name)


# ----------------------------------------------------------------------------------------------
# Reference names


def torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Ours -> torchvision's: the same names, GoogLeNet's sequential branches indexed
    ("inception3a.branch2_1.conv" -> "inception3a.branch2.1.conv")."""
    del config
    parts = path.split(".")
    return ".".join(p.replace("_", ".", 1) if p[:-2] in ("branch2", "branch3", "branch4")
                    else p for p in parts)


def _keras_order() -> dict[str, int]:
    """Our conv unit paths in Keras' creation order (stem, then each block's branches)."""
    names = [u.name for u in V3_STEM if isinstance(u, Unit)]
    for item in V3_BODY:
        if isinstance(item, tuple):
            block_name, block = item
            names += [f"{block_name}.{u.name}" for branch in block for u in _units(branch)]
    return {name: i for i, name in enumerate(names)}


_KERAS_ORDER = _keras_order()


def keras_name(path: str, config: Mapping[str, Any]) -> str | tuple[str, int]:
    """Ours -> keras.applications InceptionV3's layer names. Its conv2d_bn layers are unnamed,
    so Keras numbers them in creation order: these are the names of a fresh Keras 3 session
    ("conv2d", "conv2d_1", ...; `nets.convert.from_keras` renames any session's or file's
    numbering so). Its BatchNorms have no gamma (scale=False): their weights [beta, moving
    mean, moving variance] sit one place earlier than a full BatchNorm's (offset -1). The
    classifier is "predictions"."""
    if path == "fc":
        return "predictions"
    unit, layer = path.rsplit(".", 1)
    if unit not in _KERAS_ORDER or layer not in ("conv", "bn"):
        raise ValueError(f"{path} has no counterpart in keras.applications' InceptionV3")
    index = _KERAS_ORDER[unit]
    suffix = f"_{index}" if index else ""
    if layer == "conv":
        return f"conv2d{suffix}"
    return (f"batch_normalization{suffix}", 0 if config.get("bn_scale", True) else -1)


# ----------------------------------------------------------------------------------------------
# Registered variants. Counts without auxiliary heads (the tests count both against torchvision:
# googlenet with them 13,004,888, inception_v3 27,161,264 - torchvision's published figure,
# whose inception_v3 weights keep the head; its googlenet weights drop theirs).

# Both torchvision weights take transform_input=True: images normalised with ImageNet's mean and
# std, mapped inside the model to (x - 0.5) / 0.5, TF's [-1, 1] inputs the weights were ported
# with. Ours take the [-1, 1] inputs directly (transform_input off), as Keras' preprocess_input.


def _torch_variant(name, counts, **config) -> ModelInfo:
    with_head, no_head, bn_stats = counts
    v3 = config["architecture"] == "inception_v3"
    size = 299 if v3 else 224
    return ModelInfo(
        name=name, family="inception", builder=Inception, config=config,
        reference=f"torchvision:{name}", reference_params=with_head,
        reference_params_no_head=no_head, reference_bn_stat_elems=bn_stats,
        train_size=size, test_size=size,
        # torchvision: resize 342, crop 299 (Inception-v3); resize 256, crop 224.
        preprocessing=dataclasses.replace(UNIT_RANGE_PREPROCESSING,
                                          crop_fraction=299 / 342 if v3 else 0.875),
        min_input_size=V3_MIN_SIZE if v3 else GOOGLENET_MIN_SIZE,
        feature_sizes=v3_stage_sizes if v3 else None, classifier="fc", torch_name=torch_name)


KERAS_CONFIG = dict(architecture="inception_v3", dropout_rate=0.0, bn_decay=0.99,
                    bn_scale=False, unbiased_running_var=False, pool_counts_padding=False,
                    init="keras")

VARIANTS = (
    _torch_variant("googlenet", (6624904, 5599904, 14560), architecture="googlenet",
                   dropout_rate=0.2),
    _torch_variant("inception_v3", (23834568, 21785568, 34432), architecture="inception_v3"),
    ModelInfo(name="keras_inception_v3", family="inception", builder=Inception,
              config=KERAS_CONFIG, reference="keras:InceptionV3",
              reference_params=23817352, reference_params_no_head=21768352,
              reference_bn_stat_elems=34432, train_size=299, test_size=299,
              preprocessing=UNIT_RANGE_PREPROCESSING,
              min_input_size=V3_MIN_SIZE, feature_sizes=v3_stage_sizes, classifier="fc",
              keras_name=keras_name, keras_builder="InceptionV3"),
)
