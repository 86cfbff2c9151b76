"""BiFPN (Tan, Pang & Le 2020), exact to the official google/automl EfficientDet code.

A cell fuses the maps of levels min..max (P3-P7, or P3-P8) along a top-down then a bottom-up
path (`node_graph`). Each node resamples its inputs to its level's size (a 1x1 conv + BN where
the channels are not the BiFPN width, which only happens to the backbone's maps in the first
cell; then a 3x3/2 SAME max-pool to go down or nearest-neighbour upsampling to go up), fuses
them (fast normalised fusion: ReLU'd scalar weights, divided by their sum + 1e-4; or a plain
sum), and applies swish -> separable 3x3 conv (its pointwise part with a bias) -> BN: the node
outputs are pre-activation. Sizes come from the image: level l is the image size halved l
times, rounding up, as the official model stores them, so inputs that are not a multiple of
2^max_level upsample to those sizes, not by x2. BN is TF's (decay 0.99, eps 1e-3); kernels
Keras' Glorot-uniform, with Keras' fans for depthwise kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nets import layers

FUSION_EPS = 1e-4  # the official fast-attention epsilon


def keras_depthwise(init):
    """`init` with Keras' fans for a depthwise kernel, which Keras stores as (kh, kw, C, 1):
    fan_in = kh * kw * C, fan_out = kh * kw. Ours is (kh, kw, 1, C)."""

    def depthwise_init(shape, dtype):
        return init((*shape[:-2], shape[-1], 1), dtype).reshape(shape)

    return depthwise_init


GLOROT = hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform")  # Keras' default kernel init


def batch_norm(name: str, decay: float = 0.99, eps: float = 1e-3) -> layers.BatchNorm:
    return layers.BatchNorm(decay, eps, unbiased_running_var=False, name=name)


def level_sizes(image_hw: Sequence[int], max_level: int) -> list[tuple[int, int]]:
    """(h, w) of levels 0..max_level: each the previous halved, rounding up."""
    sizes = [tuple(image_hw)]
    for _ in range(max_level):
        sizes.append(tuple((s - 1) // 2 + 1 for s in sizes[-1]))
    return sizes


def node_graph(min_level: int, max_level: int) -> list[tuple[int, tuple[int, ...]]]:
    """The nodes of one cell in computation order, as (level, input ids): ids 0..L-1 are the
    cell's inputs (levels min..max), node k gets id L + k. Top-down from max - 1: the level's
    last node and the level above's; then bottom-up from min + 1: all the level's nodes so far
    and the level below's last. The cell's outputs are each level's last node."""
    ids = {level: [i] for i, level in enumerate(range(min_level, max_level + 1))}
    nodes, next_id = [], max_level - min_level + 1
    for level in range(max_level - 1, min_level - 1, -1):
        nodes.append((level, (ids[level][-1], ids[level + 1][-1])))
        ids[level].append(next_id)
        next_id += 1
    for level in range(min_level + 1, max_level + 1):
        nodes.append((level, (*ids[level], ids[level - 1][-1])))
        ids[level].append(next_id)
        next_id += 1
    return nodes


def resize_nearest(x, size: tuple[int, int]):
    """TF v1 `resize_nearest_neighbor` (no align corners, no half-pixel centres): output
    index i reads floor(i * in / out), computed in float32 as TF and PyTorch do."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        elif out != n:
            scale = np.float32(n) / np.float32(out)
            index = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale), n - 1)
            x = jnp.take(x, index.astype(np.int32), axis=axis)
    return x


def resample(x, size: tuple[int, int]):
    """To `size`: max-pool when larger on both sides (window stride + 1, stride
    (h - 1) // target + 1, TF SAME padding: 3x3/2 for a halving), nearest upsampling when
    smaller, else unchanged."""
    h, w = x.shape[1:3]
    if h > size[0] and w > size[1]:
        strides = ((h - 1) // size[0] + 1, (w - 1) // size[1] + 1)
        windows = tuple(s + 1 for s in strides)
        pads = [layers.conv_padding("same", [n], [k], [s], [1])[0]
                for n, k, s in zip((h, w), windows, strides)]
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *windows, 1),
                                     (1, *strides, 1), [(0, 0), *pads, (0, 0)])
    if h < size[0] or w < size[1]:
        return resize_nearest(x, size)
    return x


class Resample(hk.Module):
    """A map brought to `width` channels (1x1 conv with bias + BN, no activation, only where
    its channels differ) and then to `size` (`resample`)."""

    def __init__(self, width: int, name: str | None = None):
        super().__init__(name=name)
        self.width = width

    def __call__(self, x, size, is_training: bool):
        if x.shape[-1] != self.width:
            x = layers.Conv(self.width, 1, with_bias=True, w_init=GLOROT, name="conv")(x)
            x = batch_norm("bn")(x, is_training)
        return resample(x, size)


class SeparableConv(hk.Module):
    """Depthwise kxk conv (no bias) then pointwise 1x1 conv (with bias), TF SAME padding."""

    def __init__(self, out_channels: int, kernel_size: int = 3, dw_init=None, pw_init=None,
                 b_init=None, name: str | None = None):
        super().__init__(name=name)
        self.out_channels, self.kernel_size = out_channels, kernel_size
        self.dw_init = dw_init or keras_depthwise(GLOROT)
        self.pw_init, self.b_init = pw_init or GLOROT, b_init

    def __call__(self, x):
        x = layers.Conv(x.shape[-1], self.kernel_size, padding="same", groups=x.shape[-1],
                        w_init=self.dw_init, name="conv_dw")(x)
        return layers.Conv(self.out_channels, 1, with_bias=True, w_init=self.pw_init,
                           b_init=self.b_init, name="conv_pw")(x)


class FusionNode(hk.Module):
    """One BiFPN node: resample each input to `size`, fuse, swish, separable conv, BN.
    fusion="fastattn": sum_i relu(w_i) x_i / (sum_j relu(w_j) + 1e-4) with one scalar weight
    per input (`fusion_weights`, initially 1); "sum": the plain sum."""

    def __init__(self, width: int, fusion: str, activation: str, name: str | None = None):
        super().__init__(name=name)
        if fusion not in ("fastattn", "sum"):
            raise ValueError(f"fusion must be 'fastattn' or 'sum', got {fusion!r}")
        self.width, self.fusion, self.activation = width, fusion, activation

    def __call__(self, inputs: Sequence[tuple[int, jax.Array]], size, is_training: bool):
        maps = [Resample(self.width, name=f"resample_{i}")(x, size, is_training)
                for i, x in inputs]
        if self.fusion == "fastattn":
            raw = hk.get_parameter("fusion_weights", (len(maps),), jnp.float32, init=jnp.ones)
            weights = jax.nn.relu(raw).astype(maps[0].dtype)
            total = jnp.sum(weights) + FUSION_EPS
            x = sum(m * weights[i] / total for i, m in enumerate(maps))
        else:
            x = sum(maps)
        x = SeparableConv(self.width, name="conv")(layers.activation(self.activation)(x))
        return batch_norm("bn")(x, is_training)


class BiFPN(hk.Module):
    """Extra levels above the backbone's (P6 = 3x3/2 max-pool of BN(1x1 conv(C5)), each further
    level a max-pool of the one below), then `cells` BiFPN cells. Takes the backbone's maps of
    levels min..(min + len - 1) and the image's (h, w); returns the maps of min..max_level."""

    def __init__(self, width: int, cells: int, min_level: int = 3, max_level: int = 7,
                 fusion: str = "fastattn", activation: str = "swish", name: str | None = None):
        super().__init__(name=name)
        self.width, self.cells, self.fusion, self.activation = width, cells, fusion, activation
        self.min_level, self.max_level = min_level, max_level

    def __call__(self, maps: Sequence[jax.Array], image_hw, is_training: bool):
        sizes = level_sizes(image_hw, self.max_level)
        maps = list(maps)
        for level in range(self.min_level + len(maps), self.max_level + 1):
            maps.append(Resample(self.width, name=f"resample_p{level}")(
                maps[-1], sizes[level], is_training))
        for r in range(self.cells):
            maps = BiFPNCell(self.width, self.min_level, self.max_level, self.fusion,
                             self.activation, name=f"cell_{r}")(maps, sizes, is_training)
        return maps


class BiFPNCell(hk.Module):
    """One cell: the nodes of `node_graph`, each a `FusionNode` (`node_0`, `node_1`, ...)."""

    def __init__(self, width: int, min_level: int, max_level: int, fusion: str,
                 activation: str, name: str | None = None):
        super().__init__(name=name)
        self.width, self.fusion, self.activation = width, fusion, activation
        self.min_level, self.max_level = min_level, max_level

    def __call__(self, maps: Sequence[jax.Array], sizes, is_training: bool):
        graph, nodes = node_graph(self.min_level, self.max_level), list(maps)
        last = {}
        for k, (level, ids) in enumerate(graph):
            node = FusionNode(self.width, self.fusion, self.activation, name=f"node_{k}")
            nodes.append(node([(i, nodes[i]) for i in ids], sizes[level], is_training))
            last[level] = nodes[-1]
        return [last[level] for level in range(self.min_level, self.max_level + 1)]
