"""Attention and multi-branch convolutions of the ResNet family's blocks.

Each module is a layer (no architecture knowledge) named after the reference's submodules
(timm), so that weight conversion stays a renaming:

- `Cbam`: CBAM (Woo et al. 2018): channel attention from average- and max-pooled descriptors
  through one shared MLP, then spatial attention from a 7x7 conv over [mean, max] across channels.
- `GlobalContext`: the GCNet block (Cao et al. 2019): attention pooling (a 1x1 conv and a softmax
  over positions), a bottleneck transform 1x1 - LayerNorm - ReLU - 1x1, fused by addition (the
  paper's choice) or as a sigmoid gate.
- `SplitAttentionConv`: ResNeSt's split-attention 3x3 conv (Zhang et al. 2020).
- `SelectiveKernelConv`: SKNet's selective-kernel conv (Li et al. 2019).

The attention MLPs are 1x1 convs on pooled (B, 1, 1, C) maps, as in the references, so that they
take the ResNet family's conv init and grouped variants need nothing special.
"""

from __future__ import annotations

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers


def _pooled(x, reduce=jnp.mean):
    """(B, H, W, C) -> (B, 1, 1, C)."""
    return reduce(x, axis=(1, 2), keepdims=True)


class Cbam(hk.Module):
    """CBAM: x * sigmoid(MLP(avgpool x) + MLP(maxpool x)), then
    x * sigmoid(BN(conv7x7([mean_c x, max_c x]))). The MLP is `channel/fc1`, `channel/fc2`
    (reduced_channels wide, no biases, as timm's CbamModule); the spatial conv `spatial/conv`
    (no bias) and its BatchNorm `spatial/bn`."""

    def __init__(self, reduced_channels: int, kernel_size: int = 7, bn_decay: float = 0.9,
                 bn_eps: float = 1e-5, name: str | None = None):
        super().__init__(name=name)
        self.reduced_channels, self.kernel_size = reduced_channels, kernel_size
        self.bn_decay, self.bn_eps = bn_decay, bn_eps

    def __call__(self, x, is_training: bool):
        c = x.shape[-1]
        with hk.name_scope("channel"):
            fc1 = layers.Conv(self.reduced_channels, 1, name="fc1")
            fc2 = layers.Conv(c, 1, name="fc2")
            mlp = lambda v: fc2(jax.nn.relu(fc1(v)))  # noqa: E731  (one MLP, two inputs)
            x = x * jax.nn.sigmoid(mlp(_pooled(x)) + mlp(_pooled(x, jnp.max)))
        with hk.name_scope("spatial"):
            s = jnp.concatenate([jnp.mean(x, -1, keepdims=True), jnp.max(x, -1, keepdims=True)],
                                axis=-1)
            s = layers.Conv(1, self.kernel_size, name="conv")(s)
            s = layers.BatchNorm(self.bn_decay, self.bn_eps, name="bn")(s, is_training)
        return x * jax.nn.sigmoid(s)


class GlobalContext(hk.Module):
    """GCNet's global context block.

    context = sum_j softmax_j(conv_attn(x)_j) x_j (one attention map shared by all channels);
    transform = fc2(ReLU(LayerNorm(fc1(context)))) with fc1 C -> reduced_channels;
    fusion "add": x + transform (the paper's best, `mlp_add`), "scale": x * sigmoid(transform)
    (`mlp_scale`). The LayerNorm's eps is 1e-5 in the authors' code (mmcv's nn.LayerNorm) and
    1e-6 in timm's. Init as the authors': conv_attn He-normal over fan-in, the transform's last
    conv zero so that the block starts as the identity (add) or a constant 0.5 gate (scale).
    """

    def __init__(self, reduced_channels: int, fusion: str = "add", layer_norm_eps: float = 1e-5,
                 name: str | None = None):
        super().__init__(name=name)
        if fusion not in ("add", "scale"):
            raise ValueError(f"GlobalContext fusion must be 'add' or 'scale', got {fusion!r}")
        self.reduced_channels, self.fusion = reduced_channels, fusion
        self.layer_norm_eps = layer_norm_eps

    def __call__(self, x):
        b, h, w, c = x.shape
        logits = layers.Conv(1, 1, with_bias=True, name="conv_attn",
                             w_init=hk.initializers.VarianceScaling(2.0, "fan_in", "normal"))(x)
        weights = jax.nn.softmax(logits.reshape(b, h * w).astype(jnp.float32), axis=-1)
        context = jnp.einsum("bp,bpc->bc", weights.astype(x.dtype), x.reshape(b, h * w, c))
        with hk.name_scope(f"mlp_{self.fusion}"):
            t = layers.Conv(self.reduced_channels, 1, with_bias=True, name="fc1")(
                context[:, None, None, :])
            t = hk.LayerNorm(-1, True, True, eps=self.layer_norm_eps, name="norm")(t)
            t = layers.Conv(c, 1, with_bias=True, w_init=jnp.zeros, name="fc2")(jax.nn.relu(t))
        return x + t if self.fusion == "add" else x * jax.nn.sigmoid(t)


class SplitAttentionConv(hk.Module):
    """ResNeSt's split attention around a k x k conv (with its BatchNorm and ReLU).

    The conv has `radix` splits per cardinal group (groups * radix groups, out_channels * radix
    outputs); the splits are summed, pooled, sent through fc1 (grouped by cardinality, with BN
    and ReLU) and fc2, and a softmax over the splits of each group weighs them (r-softmax).
    With one split the reference gates with a sigmoid instead (an SE per cardinal group). The
    attention width is make_divisible(in * radix / 4, 8, min 32) as the official code.
    Submodules: `conv`, `bn0`, `fc1`, `bn1`, `fc2` (timm's SplitAttn).
    """

    def __init__(self, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, groups: int = 1, radix: int = 2, bn_decay: float = 0.9,
                 bn_eps: float = 1e-5, name: str | None = None):
        super().__init__(name=name)
        self.out_channels, self.kernel_size, self.stride = out_channels, kernel_size, stride
        self.dilation, self.groups, self.radix = dilation, groups, radix
        self.bn_decay, self.bn_eps = bn_decay, bn_eps

    def __call__(self, x, is_training: bool):
        radix, groups, c = self.radix, self.groups, self.out_channels
        attn_channels = layers.make_divisible(x.shape[-1] * radix / 4, 8, min_value=32)
        bn = lambda name: layers.BatchNorm(self.bn_decay, self.bn_eps, name=name)  # noqa: E731
        x = layers.Conv(c * radix, self.kernel_size, self.stride, dilation=self.dilation,
                        groups=groups * radix, name="conv")(x)
        x = jax.nn.relu(bn("bn0")(x, is_training))
        splits = x.reshape(*x.shape[:-1], radix, c)  # channel r * c + j is split r, channel j
        s = _pooled(jnp.sum(splits, axis=-2))
        s = layers.Conv(attn_channels, 1, groups=groups, with_bias=True, name="fc1")(s)
        s = jax.nn.relu(bn("bn1")(s, is_training))
        s = layers.Conv(c * radix, 1, groups=groups, with_bias=True, name="fc2")(s)
        if radix == 1:
            return x * jax.nn.sigmoid(s)
        # fc2's outputs are ordered (group, split, channel-in-group); weights (split, channel).
        s = s.reshape(s.shape[0], groups, radix, c // groups)
        s = jnp.swapaxes(jax.nn.softmax(s, axis=2), 1, 2).reshape(s.shape[0], 1, 1, radix, c)
        return jnp.sum(splits * s, axis=-2)


class SelectiveKernelConv(hk.Module):
    """SKNet's selective kernel conv: split (one conv-BN-ReLU path per kernel size), fuse (sum,
    pool, fc_reduce - BN - ReLU), select (fc_select and a softmax across paths per channel).

    Kernels larger than 3 are 3x3 convs dilated to the same extent (the paper's 5x5 as a dilated
    3x3). attn_channels is the fuse width d = max(C / r, L) of the paper. `split_input` feeds each
    path its own slice of the input channels (timm's parameter-saving change for SK-ResNets; the
    paper's SKNet-50 feeds every path the whole input). Submodules: `paths_i` (`conv`, `bn`),
    `attn` (`fc_reduce`, `bn`, `fc_select`), as timm's SelectiveKernel.
    """

    def __init__(self, out_channels: int, attn_channels: int, kernels: Sequence[int] = (3, 5),
                 stride: int = 1, dilation: int = 1, groups: int = 1, split_input: bool = True,
                 bn_decay: float = 0.9, bn_eps: float = 1e-5, name: str | None = None):
        super().__init__(name=name)
        self.out_channels, self.attn_channels = out_channels, attn_channels
        self.kernels, self.stride, self.dilation = tuple(kernels), stride, dilation
        self.groups, self.split_input = groups, split_input
        self.bn_decay, self.bn_eps = bn_decay, bn_eps

    def __call__(self, x, is_training: bool):
        n = len(self.kernels)
        if self.split_input and x.shape[-1] % n:
            raise ValueError(f"{self.module_name}: {x.shape[-1]} input channels do not split "
                             f"into {n} paths")
        inputs = jnp.split(x, n, axis=-1) if self.split_input else [x] * n
        paths = jnp.stack([
            layers.ConvBN(self.out_channels, 3, self.stride,
                          dilation=self.dilation * (k - 1) // 2, groups=self.groups,
                          bn_decay=self.bn_decay, bn_eps=self.bn_eps,
                          name=f"paths_{i}")(xi, is_training)
            for i, (k, xi) in enumerate(zip(self.kernels, inputs))], axis=-2)
        with hk.name_scope("attn"):
            s = layers.Conv(self.attn_channels, 1, name="fc_reduce")(_pooled(paths.sum(-2)))
            s = jax.nn.relu(layers.BatchNorm(self.bn_decay, self.bn_eps, name="bn")(
                s, is_training))
            s = layers.Conv(self.out_channels * n, 1, name="fc_select")(s)
        weights = jax.nn.softmax(s.reshape(s.shape[0], 1, 1, n, self.out_channels), axis=-2)
        return jnp.sum(paths * weights, axis=-2)
