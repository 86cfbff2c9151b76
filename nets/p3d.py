"""Pseudo-3D ResNet (Qiu et al. 2017, "Learning Spatio-Temporal Representation with Pseudo-3D
Residual Networks") for video clips [batch, time, height, width, channels].

A ResNet bottleneck whose 3x3 conv is split into a spatial 1x3x3 conv S and a temporal 3x1x1
conv T, both as wide as the bottleneck, each followed by BN:

- P3D-A: S then T in series;
- P3D-B: S and T in parallel on the same input, outputs added;
- P3D-C: S then T, plus a shortcut from S's output (S + T(S)).

Blocks cycle A, B, C, A, B, C... through res2-res4 across stage boundaries (the paper's P3D
ResNet). The network follows the authors' released definition (the P3D-199 Caffe prototxt of
ZhaofanQiu/pseudo-3d-residual-networks, `deploy_p3d_resnet_kinetics.prototxt`):

- stem: 1x7x7 conv, stride (1, 2, 2), BN, ReLU, then a max pool 2x3x3 stride 2 (time halved);
- res2-res4 are 3-D; before res3, res4 and res5 a 2x1x1 stride-2 max pool halves the time axis;
  spatial downsampling is the stride (1, 2, 2) of the first block's first 1x1 conv and of its
  1x1 projection shortcut (Caffe ResNet style: stride on the 1x1, not the 3x3);
- res5 is a plain 2-D bottleneck stage (1x1, 3x3, 1x1) once time has been pooled to one frame;
- head: global average pool, dropout 0.5, fc with bias (400 Kinetics classes).

With the default 16 x 160 x 160 clips the time axis goes 16 -> 8 -> 4 -> 2 -> 1 and res5 sees
10 x 10 (the prototxt reshapes to exactly that).

The widely used PyTorch port (qijiezhao/pseudo-3d-pytorch, `p3d_model.py`, whose checkpoints are
converted from the Caffe weights; it calls the (3, 4, 6, 3) network P3D63) has the same
parameters but disagrees with the prototxt in three places, selectable with
`definition="pytorch"`:

- P3D-B: Caffe computes ReLU(ReLU(BN(S x)) + BN(T x)); the port ReLU(BN(S x)) + ReLU(BN(T x)).
- P3D-C: Caffe computes ReLU(0.5 * s + 0.5 * BN(T s)) with s = ReLU(BN(S x)) (its Eltwise
  coefficients are 0.5, 0.5); the port s + ReLU(BN(T s)), the unweighted S + T(S) that the
  paper's Figure 3 draws.
- Pooling: Caffe's Pooling3D has no padding and rounds output sizes up (windows that overhang
  the end are clipped); the port pads the stem pool spatially by 1 and rounds down. Both give
  the same sizes at 160 px and 16 frames, but different windows. Caffe collapses clips of 1-16
  frames to one frame before res5, the port clips of 16-31 frames; other lengths are an error
  (both references need time to be 1 there).

Module names mirror the port (`layer3_5/conv3` is `layer3.5.conv3`: conv2/bn2 are S, conv3/bn3
are T, conv_normal/bn_normal the 2-D 3x3 of res5), so its weights convert by renaming
(`torch_name`). BatchNorm: momentum 0.9 and eps 1e-5 (PyTorch's defaults, and those of the
Caffe BN layer, which the prototxt does not override).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax

from nets import layers
from nets.records import ModelInfo, Preprocessing

STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = 4
DEFINITIONS = ("caffe", "pytorch")
KINDS = ("A", "B", "C")


def _pool_padding(size: int, window: int, stride: int, pad: int, ceil_mode: bool):
    """(low, high) padding under which a VALID window reduction gives the reference's size:
    PyTorch rounds the output size down; Caffe rounds it up and clips the overhanging window."""
    if ceil_mode:
        out = -(-(size + 2 * pad - window) // stride) + 1
    else:
        out = (size + 2 * pad - window) // stride + 1
    if out < 1:
        raise ValueError(f"a max pool of window {window} and stride {stride} leaves nothing of "
                         f"an axis of length {size}")
    # Floor rounding may leave input unread at the end (no high padding needed there).
    return pad, max((out - 1) * stride + window - size - pad, 0)


def frames_before_last_stage(frames: int, definition: str = "caffe") -> int:
    """The time length a clip of `frames` has after the stem pool and the three temporal pools
    (0 where a pool leaves nothing); the 2-D last stage needs exactly 1."""
    for _ in range(4):
        try:
            low, high = _pool_padding(frames, 2, 2, 0, definition == "caffe")
        except ValueError:
            return 0
        frames = (frames + low + high - 2) // 2 + 1
    return frames


def max_pool(x, window: Sequence[int], stride: Sequence[int], definition: str = "caffe"):
    """Max pooling of [B, T, H, W, C] with per-axis (t, h, w) windows and strides, as the
    reference computes it: Caffe's Pooling3D (no padding, ceil rounding) or the PyTorch port's
    MaxPool3d (stem pool padded spatially by window // 2, floor rounding)."""
    if definition not in DEFINITIONS:
        raise ValueError(f"definition must be one of {DEFINITIONS}, got {definition!r}")
    caffe = definition == "caffe"
    (kt, kh, kw), (st, sh, sw) = window, stride
    b, t, h, w, c = x.shape
    # A box max is separable: pool time, then space, each with layers.max_pool.
    if kt > 1 or st > 1:
        pads = [_pool_padding(t, kt, st, 0, caffe)]
        x = layers.max_pool(x.reshape(b, t, h * w * c), kt, st, padding=pads)
        x = x.reshape(b, -1, h, w, c)
    if kh > 1 or sh > 1:
        if kh != kw or sh != sw:
            raise ValueError("spatial pooling windows and strides must be square")
        pad = 0 if caffe else kh // 2
        pads = [_pool_padding(n, kh, sh, pad, caffe) for n in (h, w)]
        t = x.shape[1]
        y = layers.max_pool(x.reshape(b * t, h, w, c), kh, sh, padding=pads)
        x = y.reshape(b, t, *y.shape[1:])
    return x


class P3DBlock(hk.Module):
    """Bottleneck: 1x1 (strided) + BN + ReLU, the pseudo-3D unit of `kind` ("A", "B", "C") or
    a 2-D 3x3 ("2d"), 1x1 to 4 * planes + BN, projection shortcut where shapes change, add, ReLU.
    """

    def __init__(self, planes: int, stride: int, kind: str, opts: Mapping[str, Any],
                 name: str):
        super().__init__(name=name)
        self.planes, self.stride, self.kind, self.opts = planes, stride, kind, opts

    @hk.name_like("__call__")
    def _conv_bn(self, x, out, kernel, stride, conv_name, bn_name, is_training):
        ndim = 2 if self.kind == "2d" else 3
        if ndim == 3:
            stride = (1, stride, stride)  # P3D never strides time with a conv
        x = layers.Conv(out, kernel, stride, ndim=ndim, name=conv_name)(x)
        bn = layers.BatchNorm(self.opts["bn_decay"], self.opts["bn_eps"], name=bn_name)
        return bn(x, is_training)

    @hk.name_like("__call__")
    def _pseudo_3d(self, x, is_training):
        def spatial(h):
            return jax.nn.relu(self._conv_bn(h, self.planes, (1, 3, 3), 1, "conv2", "bn2",
                                             is_training))

        def temporal(h):  # without its ReLU: where that goes differs between the references
            return self._conv_bn(h, self.planes, (3, 1, 1), 1, "conv3", "bn3", is_training)

        caffe = self.opts["definition"] == "caffe"
        relu = jax.nn.relu
        if self.kind == "A":
            return relu(temporal(spatial(x)))
        if self.kind == "B":
            s, t = spatial(x), temporal(x)
            return relu(s + t) if caffe else s + relu(t)
        s = spatial(x)  # "C"
        t = temporal(s)
        return relu(0.5 * s + 0.5 * t) if caffe else s + relu(t)

    def __call__(self, x, is_training):
        out_channels = self.planes * EXPANSION
        out = jax.nn.relu(self._conv_bn(x, self.planes, 1, self.stride, "conv1", "bn1",
                                        is_training))
        if self.kind == "2d":
            out = jax.nn.relu(self._conv_bn(out, self.planes, 3, 1, "conv_normal", "bn_normal",
                                            is_training))
        else:
            out = self._pseudo_3d(out, is_training)
        out = self._conv_bn(out, out_channels, 1, 1, "conv4", "bn4", is_training)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_channels:
            shortcut = self._conv_bn(x, out_channels, 1, self.stride, "downsample_conv",
                                     "downsample_bn", is_training)
        return jax.nn.relu(out + shortcut)


class P3DResNet(hk.Module):
    """Pseudo-3D ResNet on clips [B, T, H, W, C]. `__call__` gives logits (pooled features when
    num_classes=0); `features` gives {"stage1": [B, T/2, H/4, W/4, 256], "stage2",
    "stage3" (3-D, before their temporal pools), "stage4": [B, H/32, W/32, 2048] (2-D)}.

    Args:
      layers: blocks per stage; the last stage is 2-D, the others pseudo-3D.
      cycle: the block kinds cycled through the pseudo-3D blocks in order: "ABC" is the
        paper's P3D ResNet; "A", "B" or "C" give its single-kind ablations.
      definition: "caffe" (the authors' prototxt) or "pytorch" (the qijiezhao port); see the
        module docstring for where they differ.
      dropout_rate: dropout before the fc while training (0.5 in both references).
      bn_decay, bn_eps: BatchNorm running-average decay and epsilon.
    """

    def __init__(self, layers: Sequence[int] = (3, 8, 36, 3), num_classes: int = 400,
                 cycle: str = "ABC", definition: str = "caffe", dropout_rate: float = 0.5,
                 in_channels: int = 3, bn_decay: float = 0.9, bn_eps: float = 1e-5,
                 name: str = "p3d"):
        super().__init__(name=name)
        if len(layers) != 4 or any(int(n) != n or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)!r}")
        if not cycle or any(k not in KINDS for k in cycle):
            raise ValueError(f"cycle must be a non-empty string of {KINDS}, got {cycle!r}")
        if definition not in DEFINITIONS:
            raise ValueError(f"definition must be one of {DEFINITIONS}, got {definition!r}")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
        self.layers, self.cycle, self.definition = tuple(layers), cycle, definition
        self.num_classes, self.in_channels = num_classes, in_channels
        self.dropout_rate = dropout_rate
        self.opts = dict(definition=definition, bn_decay=bn_decay, bn_eps=bn_eps)

    def block_kinds(self) -> tuple[str, ...]:
        """The kind of every block in order: "A", "B", "C" (pseudo-3D) or "2d" (last stage)."""
        n_3d = sum(self.layers[:3])
        return tuple(self.cycle[i % len(self.cycle)] for i in range(n_3d)) + (
            ("2d",) * self.layers[3])

    def _temporal_pool(self, x):
        return max_pool(x, (2, 1, 1), (2, 1, 1), self.definition)

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels, spatial_dims=3)
        if frames_before_last_stage(images.shape[1], self.definition) != 1:
            frames = "1-16" if self.definition == "caffe" else "16-31"
            raise ValueError(
                f"{self.module_name} pools time to one frame before its 2-D last stage, which "
                f"a clip of {images.shape[1]} frames does not; with "
                f"definition={self.definition!r} clips of {frames} frames do.")
        x = layers.Conv(64, (1, 7, 7), (1, 2, 2), ndim=3, name="conv1_custom")(images)
        x = layers.BatchNorm(self.opts["bn_decay"], self.opts["bn_eps"], name="bn1")(
            x, is_training)
        x = max_pool(jax.nn.relu(x), (2, 3, 3), (2, 2, 2), self.definition)
        kinds, maps = iter(self.block_kinds()), {}
        for s, (planes, depth) in enumerate(zip(STAGE_PLANES, self.layers)):
            if s > 0:
                x = self._temporal_pool(x)
            if s == 3:
                x = x[:, 0]  # the prototxt's Reshape to [N, C, H, W]
            for i in range(depth):
                stride = 2 if s > 0 and i == 0 else 1
                x = P3DBlock(planes, stride, next(kinds), self.opts,
                             name=f"layer{s + 1}_{i}")(x, is_training)
            maps[f"stage{s + 1}"] = x
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)["stage4"]
        return layers.classifier(x, self.num_classes, is_training,
                                 dropout_rate=self.dropout_rate)


def torch_name(path: str, config: Mapping[str, Any]) -> str:
    """Our dotted module path -> the PyTorch port's module name ("layer2_0.downsample_conv" ->
    "layer2.0.downsample.0")."""
    del config  # one naming for every variant
    renames = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
    parts = []
    for part in path.split("."):
        m = re.fullmatch(r"layer(\d)_(\d+)", part)
        parts.append(f"layer{m[1]}.{m[2]}" if m else renames.get(part, part))
    return ".".join(parts)


# ----------------------------------------------------------------------------------------------
# Registered variants. No library reference: the tests derive the counts from the stage table.

# The port crops 160 x 160 from frames resized to a 256-pixel shorter side (340 x 256).
_PREPROCESSING = Preprocessing(crop_fraction=160 / 256)


def _variant(name, **config) -> ModelInfo:
    return ModelInfo(name=name, family="p3d", builder=P3DResNet, config=config,
                     reference="paper:P3D (Qiu et al. 2017) / authors' released definition",
                     train_size=160, test_size=160, num_frames=16,
                     preprocessing=_PREPROCESSING, torch_name=torch_name)


VARIANTS = (
    _variant("p3d_resnet199", layers=(3, 8, 36, 3)),  # ResNet-152's skeleton, the port's P3D199
    _variant("p3d_resnet50", layers=(3, 4, 6, 3)),  # ResNet-50's skeleton, the port's P3D63
)
