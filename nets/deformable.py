"""Deformable convolution: v1 (Dai et al. 2017, "Deformable Convolutional Networks") and v2 with
modulation (Zhu et al. 2019, "Deformable ConvNets v2: More Deformable, Better Results").

    y[p] = sum_k w_k * m_k(p) * x(p0(p) + p_k + dp_k(p))

p0(p) is the output pixel's window origin (p * stride - padding), p_k the k-th kernel tap
(dilated), dp_k(p) a learned fractional offset and m_k(p) a learned modulation in (0, 1) (v2;
m = 1 in v1). x(.) is bilinear interpolation with the rule of torchvision.ops.deform_conv2d and
mmcv's modulated_deform_conv (their CPU and CUDA `bilinear_interpolate`): a sample at h <= -1,
h >= height, w <= -1 or w >= width is 0, and otherwise only the in-image corners of its
surrounding 2x2 cell contribute. That rule is exactly bilinear interpolation of the image
padded with zeros on every side, which is how it is computed here. Offset gradients follow
floor(): a sample exactly on an integer coordinate takes the difference toward the next pixel,
as torchvision's `get_coordinate_weight`; mmcv's and the original DCN code's backward return 0
for a sample exactly on h = -1 or w = -1 (a set of measure zero), where ours does not.

Layouts (channels-last, kernels HWIO as in `layers.Conv`):
  x        (B, H, W, C_in)
  w        (kh, kw, C_in / groups, C_out)
  offsets  (B, Ho, Wo, 2 * dg * kh * kw), channels ordered [dg][kh][kw][(dy, dx)]
  mask     (B, Ho, Wo, dg * kh * kw), channels ordered [dg][kh][kw]
dg = deformable_groups: input channel c uses the offsets and mask of group c // (C_in / dg).
These are torchvision's NCHW layouts with the channel axis moved last, so the channels of
mmcv's `conv_offset` output need no reordering (`offsets_from_torch`, `mask_from_torch` convert
torchvision tensors).

The computation is one gather of the 4 bilinear corners of all kh*kw samples of every output
pixel (floor indices, no one-hot), a weighted sum over the corners (bilinear weights times the
modulation), and one matmul over (kh*kw * C_in / groups) -> C_out per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers


def _pair(v, what: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or any(not isinstance(i, int) or i < 1 for i in pair):
        raise ValueError(f"{what} must be a positive int or a pair of them, got {v!r}")
    return pair


def offsets_from_torch(offset):
    """torchvision's offset (B, 2*dg*kh*kw, Ho, Wo), ordered [dg][kh*kw][(dy, dx)], -> ours."""
    return jnp.moveaxis(jnp.asarray(offset), 1, -1)


def mask_from_torch(mask):
    """torchvision's mask (B, dg*kh*kw, Ho, Wo) -> ours (B, Ho, Wo, dg*kh*kw)."""
    return jnp.moveaxis(jnp.asarray(mask), 1, -1)


def output_size(in_size: Sequence[int], kernel: Sequence[int], stride=1,
                padding: layers.Padding = "torch", dilation=1) -> tuple[int, int]:
    """(Ho, Wo) of a 2-d convolution: the spatial size offsets and mask must have."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    pads = layers.conv_padding(padding, in_size, kernel, stride, dilation)
    return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                 for n, (lo, hi), k, s, d in zip(in_size, pads, kernel, stride, dilation))


def deform_conv(x, w, offsets, mask=None, *, stride=1, padding: layers.Padding = "torch",
                dilation=1, groups: int = 1, deformable_groups: int = 1):
    """Deformable convolution (v2 with `mask`, v1 with `mask=None`); layouts in the module doc.

    Padding as in `layers.conv` ("torch", "same", an int or (low, high) pairs): it only sets
    the window origins, since samples outside the image read zeros whatever the padding. With
    zero offsets and a unit mask this is `layers.conv(x, w, ...)`. Computes in x's dtype; sample
    coordinates and bilinear weights in float32 (or the offsets' dtype if wider).
    """
    if w.ndim != 4:
        raise ValueError(f"deform_conv expects a (kh, kw, C_in / groups, C_out) kernel, got "
                         f"shape {w.shape}")
    kh, kw, c_per_group, c_out = w.shape
    c_in = c_per_group * groups
    layers.check_images(x, "deform_conv", c_in)
    dg = deformable_groups
    if groups < 1 or c_out % groups:
        raise ValueError(f"deform_conv: output channels {c_out} must divide by groups={groups}")
    if not isinstance(dg, int) or dg < 1 or c_in % dg:
        raise ValueError(f"deform_conv: input channels {c_in} must divide by "
                         f"deformable_groups={dg}")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    b, h, wd = x.shape[:3]
    pads = layers.conv_padding(padding, (h, wd), (kh, kw), stride, dilation)
    ho, wo = output_size((h, wd), (kh, kw), stride, pads, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"deform_conv: a {kh}x{kw} kernel with padding {pads} does not fit "
                         f"an input of {h}x{wd}")
    k = kh * kw
    if offsets.shape != (b, ho, wo, 2 * dg * k):
        raise ValueError(f"deform_conv: offsets must have shape {(b, ho, wo, 2 * dg * k)} "
                         f"([batch, out_h, out_w, 2 * deformable_groups * kh * kw]), got "
                         f"{offsets.shape}")
    if mask is not None and mask.shape != (b, ho, wo, dg * k):
        raise ValueError(f"deform_conv: mask must have shape {(b, ho, wo, dg * k)} "
                         f"([batch, out_h, out_w, deformable_groups * kh * kw]), got "
                         f"{mask.shape}")

    coord_dtype = jnp.promote_types(offsets.dtype, jnp.float32)
    # [dg][k][(dy, dx)] -> (..., k, dg): each tap's channels then come out in C_in order.
    off = offsets.astype(coord_dtype).reshape(b, ho, wo, dg, k, 2).swapaxes(3, 4)
    taps_y = jnp.repeat(jnp.arange(kh) * dilation[0], kw)
    taps_x = jnp.tile(jnp.arange(kw) * dilation[1], kh)
    origin_y = jnp.arange(ho) * stride[0] - pads[0][0]
    origin_x = jnp.arange(wo) * stride[1] - pads[1][0]
    sy = (origin_y[:, None, None] + taps_y).astype(coord_dtype)[None, :, :, :, None] + off[..., 0]
    sx = (origin_x[None, :, None] + taps_x).astype(coord_dtype)[None, :, :, :, None] + off[..., 1]

    y0, x0 = jnp.floor(sy), jnp.floor(sx)
    ly, lx = sy - y0, sx - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    # Rows of x viewed as (B * H * W * dg, C_in / dg): one gather serves every deformable group.
    base = jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None] * (h * wd * dg) + jnp.arange(
        dg, dtype=jnp.int32)
    index, weight = [], []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yc, xc = y0 + dy, x0 + dx
        inside = (yc >= 0) & (yc < h) & (xc >= 0) & (xc < wd)
        weight.append(jnp.where(inside, (ly if dy else 1 - ly) * (lx if dx else 1 - lx), 0))
        index.append(base + (jnp.clip(yc, 0, h - 1) * wd + jnp.clip(xc, 0, wd - 1)) * dg)
    index, weight = jnp.stack(index, -1), jnp.stack(weight, -1)  # (B, Ho, Wo, k, dg, 4)
    if mask is not None:
        m = mask.astype(coord_dtype).reshape(b, ho, wo, dg, k).swapaxes(3, 4)
        weight = weight * m[..., None]

    rows = x.reshape(b * h * wd * dg, c_in // dg)
    corners = jnp.take(rows, index, axis=0, mode="clip")  # (B, Ho, Wo, k, dg, 4, C_in / dg)
    samples = jnp.einsum("bhwkgqc,bhwkgq->bhwkgc", corners, weight.astype(x.dtype))
    cols = samples.reshape(b, ho, wo, k, groups, c_per_group)
    kernel = w.astype(x.dtype).reshape(k, c_per_group, groups, c_out // groups)
    y = jnp.einsum("bhwkgi,kigo->bhwgo", cols, kernel)
    return y.reshape(b, ho, wo, c_out)


class DeformableConv(hk.Module):
    """A deformable convolution whose offsets (and, with `modulated`, masks) are predicted from
    its own input by a regular conv, as mmcv's ModulatedDeformConv2dPack (DCNv2) and
    DeformConv2dPack (DCNv1).

    Parameters: `w` (kh, kw, C_in / groups, C_out), He-normal over fan-out like `layers.Conv`;
    `b` (C_out,) with `with_bias`; and the submodule "conv_offset" (mmcv's name): a `layers.Conv`
    with the same kernel, stride, padding and dilation, with bias, and 3 * dg * kh * kw outputs
    (2 * dg * kh * kw without modulation). Its first 2 * dg * kh * kw channels are the offsets,
    its last dg * kh * kw the mask logits (mmcv's chunk-into-3 and re-concatenate leaves exactly
    this order), so converting mmcv weights is a renaming. The mask is sigmoid(logits).

    Init: conv_offset's weight and bias are zero (the DCNv2 paper's init, mmcv's init_weights),
    so at init every offset is 0 and every modulation is sigmoid(0) = 0.5: the modulated layer
    is then exactly 0.5 x the regular convolution with `w` (plus bias), and the unmodulated one
    is exactly the regular convolution. Gradients still reach conv_offset at init (through the
    bilinear weights and the mask), so offsets and masks learn.
    """

    def __init__(self, out_channels: int, kernel_size: int | Sequence[int], stride=1,
                 padding: layers.Padding = "torch", dilation=1, groups: int = 1,
                 deformable_groups: int = 1, modulated: bool = True, with_bias: bool = False,
                 w_init=None, name: str | None = None):
        super().__init__(name=name)
        self.out_channels = out_channels
        self.kernel = _pair(kernel_size, "kernel_size")
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        self.padding, self.groups, self.deformable_groups = padding, groups, deformable_groups
        if not isinstance(modulated, bool):
            raise ValueError(f"modulated must be True (DCNv2) or False (DCNv1), got {modulated!r}")
        self.modulated, self.with_bias = modulated, with_bias
        self.w_init = w_init or hk.initializers.VarianceScaling(2.0, "fan_out", "normal")

    def __call__(self, x):
        c_in = x.shape[-1]
        if c_in % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{self.module_name}: channels in {c_in} and out "
                             f"{self.out_channels} must both divide by groups={self.groups}")
        if c_in % self.deformable_groups:
            raise ValueError(f"{self.module_name}: input channels {c_in} must divide by "
                             f"deformable_groups={self.deformable_groups}")
        n_offsets = 2 * self.deformable_groups * self.kernel[0] * self.kernel[1]
        n_predicted = n_offsets * 3 // 2 if self.modulated else n_offsets
        predicted = layers.Conv(n_predicted, self.kernel, self.stride, self.padding,
                                self.dilation, with_bias=True, w_init=jnp.zeros,
                                b_init=jnp.zeros, name="conv_offset")(x)
        offsets = predicted[..., :n_offsets]
        mask = jax.nn.sigmoid(predicted[..., n_offsets:]) if self.modulated else None
        w = hk.get_parameter("w", (*self.kernel, c_in // self.groups, self.out_channels),
                             jnp.float32, init=self.w_init)
        y = deform_conv(x, w.astype(x.dtype), offsets, mask, stride=self.stride,
                        padding=self.padding, dilation=self.dilation, groups=self.groups,
                        deformable_groups=self.deformable_groups)
        if self.with_bias or layers.gains_folded_bias(self.module_name):
            y = y + hk.get_parameter("b", (self.out_channels,), jnp.float32,
                                     init=jnp.zeros).astype(y.dtype)
        return y
